//! The scope rule and the signed formats, tested.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::*;
use crate::record::NodeId;
use serde_json::json;

fn fields(value: Json) -> Map<String, Json> {
    value.as_object().unwrap().clone()
}

fn new_authority(dir: &Path) -> (Authority, Verifier) {
    let cluster = crate::net::tls::create_ca(dir).unwrap();
    let authority = Authority::open(dir).unwrap();
    let pem = std::fs::read_to_string(dir.join(crate::net::tls::CA_CERT_FILE)).unwrap();
    (authority, Verifier::new(&pem, cluster).unwrap())
}

fn scopes(list: &[&str]) -> Vec<Scope> {
    list.iter()
        .map(|text| Scope::parse(text).unwrap())
        .collect()
}

#[test]
fn a_removal_verifies_shuts_the_node_out_and_leaves_the_door_open() {
    let temp = tempfile::tempdir().unwrap();
    let (authority, verifier) = new_authority(&temp.path().join("ca"));
    let node = NodeId([7; 16]);
    let signed = authority.remove(node, 1_000).unwrap();
    let bytes = signed.to_bytes();
    let verified = verifier
        .verify(&Signed::from_bytes(&bytes).unwrap())
        .unwrap();
    assert!(matches!(&verified, Verified::Removal(removal) if removal.node == node.0));
    let mut scopes = Scopes::default();
    scopes.insert(verified, &signed.signature);
    assert!(scopes.is_removed(&node));
    assert!(!scopes.is_revoked(&node));
    // It judges no change: with nothing granted or revoked, everything is allowed.
    assert!(scopes.is_empty());
    assert!(scopes.shut_out().contains(&node));
    assert_eq!(scopes.describe()[0]["removed"], json!(true));
    // Another cluster's authority cannot remove anyone here.
    let (other, _) = new_authority(&temp.path().join("other"));
    let foreign = other.remove(node, 1_000).unwrap();
    assert!(verifier.verify(&foreign).is_err());
}

#[test]
fn scopes_parse_and_print_as_given() {
    for text in [
        "customers",
        "customers:region=paris",
        "orders:open=true",
        "t:n=7",
    ] {
        assert_eq!(Scope::parse(text).unwrap().to_string(), text);
    }
    let quoted = Scope::parse("t:code=\"7\"").unwrap();
    assert_eq!(quoted.filter.as_ref().unwrap().value_json, "\"7\"");
    assert_eq!(quoted.to_string(), "t:code=\"7\"");
    for bad in [
        "",
        "Bad Name",
        "c:region",
        "c:@x=1",
        "c:f={\"a\":1}",
        "c:f=null",
    ] {
        assert!(Scope::parse(bad).is_err(), "{bad:?}");
    }
    let long = format!("c:f={}", "v".repeat(FILTER_VALUE_BYTES_MAX));
    assert!(Scope::parse(&long).is_err());
}

#[test]
fn a_comma_in_a_value_is_part_of_the_value() {
    let scope = Scope::parse("customers:city=Washington,dc").unwrap();
    assert_eq!(scope.collection, "customers");
    assert_eq!(
        scope.filter.as_ref().unwrap().value_json,
        "\"Washington,dc\""
    );
    assert_eq!(scope.to_string(), "customers:city=Washington,dc");
    // The quoted form names the same value.
    assert_eq!(
        Scope::parse("customers:city=\"Washington,dc\"").unwrap(),
        scope
    );
    assert!(scope.covers("customers", &fields(json!({"city": "Washington,dc"}))));
    assert!(!scope.covers("customers", &fields(json!({"city": "Washington"}))));
    assert!(!scope.covers("dc", &fields(json!({"city": "Washington,dc"}))));
    // A list given the old way is not a collection.
    assert!(Scope::parse("gw,c").is_err());
}

/// What `concord put` stores for `FIELD=text`: JSON when the text is JSON, else a string.
fn put_value(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_owned()))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any value (commas, colons, equals signs, quotes, spaces, any script) is one scope's
    /// value: it prints as it parses, survives signing, `grants` and reading back, and the
    /// judge covers exactly the records that hold it.
    #[test]
    fn any_value_round_trips_through_grant_grants_and_the_judge(
        value in "[^\\p{Cc}]{0,40}",
        field in "[a-z][a-z_,:]{0,10}",
    ) {
        let text = format!("customers:{field}={value}");
        let stored = put_value(&value);
        let scope = match Scope::parse(&text) {
            Ok(scope) => scope,
            Err(_) => {
                // Only values that are not a scalar are refused.
                proptest::prop_assert!(stored.is_object() || stored.is_array() || stored.is_null());
                return Ok(());
            }
        };
        proptest::prop_assert_eq!(&scope.collection, "customers");
        proptest::prop_assert_eq!(Scope::parse(&scope.to_string()).unwrap(), scope.clone());
        let record = fields(json!({ field.clone(): stored.clone() }));
        proptest::prop_assert!(scope.covers("customers", &record));
        let other = fields(json!({ field.clone(): format!("{value}x") }));
        proptest::prop_assert!(!scope.covers("customers", &other));

        // Through a signed grant and the grants listing, as `concord grants` prints it.
        let node = NodeId([9; 16]);
        let mut held = Scopes::default();
        held.insert(
            Verified::Grant(Grant {
                cluster: [1; 16],
                node: node.0,
                read: vec![scope.clone()],
                write: Vec::new(),
                issued_ms: 1,
            }),
            b"signature",
        );
        let listed = held.describe();
        let read = listed[0]["read"].as_array().unwrap();
        proptest::prop_assert_eq!(read.len(), 1);
        proptest::prop_assert_eq!(Scope::parse(read[0].as_str().unwrap()).unwrap(), scope);
        proptest::prop_assert!(held.may_read(&node, "customers", &record));
        proptest::prop_assert!(!held.may_read(&node, "customers", &other));
    }
}

#[test]
fn a_grant_verifies_only_as_signed_by_this_cluster_s_authority() {
    let temp = tempfile::tempdir().unwrap();
    let (authority, verifier) = new_authority(&temp.path().join("ca"));
    let node = NodeId([7; 16]);
    let signed = authority
        .grant(
            node,
            scopes(&["customers:region=paris"]),
            scopes(&["customers"]),
            1,
        )
        .unwrap();
    let decoded = Signed::from_bytes(&signed.to_bytes()).unwrap();
    let Verified::Grant(grant) = verifier.verify(&decoded).unwrap() else {
        panic!("a grant");
    };
    assert_eq!(grant.node, node.0);
    assert_eq!(grant.read, scopes(&["customers:region=paris"]));
    // A body changed after signing does not verify.
    let mut tampered = signed.clone();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_eq!(verifier.verify(&tampered), Err(ScopeError::BadSignature));
    // Nor one signed by another cluster's CA.
    let (other, other_verifier) = new_authority(&temp.path().join("other"));
    let foreign = other.grant(node, Vec::new(), Vec::new(), 1).unwrap();
    assert_eq!(verifier.verify(&foreign), Err(ScopeError::BadSignature));
    assert!(other_verifier.verify(&foreign).is_ok());
    // An unknown version is refused before anything else.
    let mut future = signed;
    future.version = SCOPE_FORMAT_VERSION + 1;
    assert!(matches!(
        verifier.verify(&future),
        Err(ScopeError::UnknownVersion(_))
    ));
    assert!(Signed::from_bytes(&[0xff; 8]).is_err());
}

#[test]
fn the_rule_reads_and_writes_by_grant_and_filter() {
    let temp = tempfile::tempdir().unwrap();
    let (authority, verifier) = new_authority(&temp.path().join("ca"));
    let (hq, paris) = (NodeId([1; 16]), NodeId([2; 16]));
    let mut in_force = Scopes::default();
    let paris_customer = fields(json!({"name": "Ada", "region": "paris"}));
    let tokyo_customer = fields(json!({"name": "Kei", "region": "tokyo"}));
    let place = Some((NodeId([20; 16]), 1));
    // No grants: everyone reads and writes everything.
    assert!(in_force.may_read(&paris, "customers", &tokyo_customer));
    assert_eq!(
        in_force.judge_write(&paris, place, "customers", None, Some(&tokyo_customer)),
        Ok(())
    );
    let granted = authority
        .grant(
            paris,
            scopes(&["customers:region=paris", "products"]),
            scopes(&["customers:region=paris"]),
            10,
        )
        .unwrap();
    in_force.insert(verifier.verify(&granted).unwrap(), &granted.signature);
    assert!(in_force.may_read(&paris, "customers", &paris_customer));
    assert!(!in_force.may_read(&paris, "customers", &tokyo_customer));
    assert!(in_force.may_read(&paris, "products", &fields(json!({}))));
    assert!(!in_force.may_read(&paris, "orders", &fields(json!({}))));
    // hq has no grant of its own: it reads and writes everything.
    assert!(in_force.may_read(&hq, "customers", &tokyo_customer));
    let judge =
        |scopes: &Scopes, before: Option<&Map<String, Json>>, after: Option<&Map<String, Json>>| {
            scopes.judge_write(&paris, place, "customers", before, after)
        };
    assert_eq!(
        judge(&in_force, None, Some(&paris_customer)),
        Ok(()),
        "create"
    );
    assert_eq!(
        judge(&in_force, Some(&paris_customer), Some(&paris_customer)),
        Ok(()),
        "edit"
    );
    assert_eq!(
        judge(&in_force, Some(&paris_customer), None),
        Ok(()),
        "delete"
    );
    assert_eq!(
        judge(&in_force, None, Some(&tokyo_customer)),
        Err(Refusal::OutsideGrant),
        "another region's"
    );
    assert_eq!(
        judge(&in_force, Some(&paris_customer), Some(&tokyo_customer)),
        Err(Refusal::OutsideGrant),
        "moving one out"
    );
    assert_eq!(
        judge(&in_force, Some(&tokyo_customer), None),
        Err(Refusal::OutsideGrant),
        "deleting another region's"
    );
    assert_eq!(
        in_force.judge_write(&paris, place, "products", None, None),
        Err(Refusal::OutsideGrant),
        "read-only collection"
    );
    // Granting again replaces the grant; an older grant arriving late changes nothing.
    let wider = authority
        .grant(paris, scopes(&["customers"]), scopes(&["customers"]), 20)
        .unwrap();
    in_force.insert(verifier.verify(&wider).unwrap(), &wider.signature);
    in_force.insert(verifier.verify(&granted).unwrap(), &granted.signature);
    assert_eq!(judge(&in_force, None, Some(&tokyo_customer)), Ok(()));
    assert!(in_force.may_read(&paris, "customers", &tokyo_customer));
}

#[test]
fn a_revocation_keeps_what_came_before_its_cut_off_and_only_narrows() {
    let temp = tempfile::tempdir().unwrap();
    let (authority, verifier) = new_authority(&temp.path().join("ca"));
    let node = NodeId([3; 16]);
    // Two writers of the node (two incarnations of its store).
    let (first, second) = (NodeId([30; 16]), NodeId([31; 16]));
    let mut in_force = Scopes::default();
    let revoked = authority
        .revoke(node, BTreeMap::from([(first, 5), (second, 9)]), 1)
        .unwrap();
    in_force.insert(verifier.verify(&revoked).unwrap(), &revoked.signature);
    let judge = |scopes: &Scopes, place: Option<(NodeId, u64)>| {
        scopes.judge_write(&node, place, "t", None, Some(&fields(json!({}))))
    };
    assert_eq!(judge(&in_force, Some((first, 5))), Ok(()));
    assert_eq!(judge(&in_force, Some((first, 6))), Err(Refusal::Revoked));
    assert_eq!(judge(&in_force, Some((second, 9))), Ok(()));
    assert_eq!(
        judge(&in_force, Some((NodeId([32; 16]), 1))),
        Err(Refusal::Revoked),
        "a writer the revocation does not name"
    );
    assert_eq!(judge(&in_force, None), Err(Refusal::Revoked), "no place");
    assert!(!in_force.may_read(&node, "t", &fields(json!({}))));
    // Another node is not touched.
    assert_eq!(
        in_force.judge_write(&NodeId([8; 16]), None, "t", None, None),
        Ok(())
    );
    // A later revocation with larger cut-offs lets nothing more in.
    let later = authority
        .revoke(node, BTreeMap::from([(first, 50), (second, 4)]), 2)
        .unwrap();
    in_force.insert(verifier.verify(&later).unwrap(), &later.signature);
    assert_eq!(judge(&in_force, Some((first, 6))), Err(Refusal::Revoked));
    assert_eq!(judge(&in_force, Some((second, 5))), Err(Refusal::Revoked));
    assert_eq!(judge(&in_force, Some((second, 4))), Ok(()));
}

#[test]
fn decisions_do_not_depend_on_the_order_grants_and_revocations_arrive_in() {
    let temp = tempfile::tempdir().unwrap();
    let (authority, verifier) = new_authority(&temp.path().join("ca"));
    let node = NodeId([4; 16]);
    let writer = NodeId([40; 16]);
    let signed = [
        authority
            .grant(node, scopes(&["c:r=a"]), scopes(&["c:r=a"]), 5)
            .unwrap(),
        authority
            .grant(node, scopes(&["c"]), scopes(&["c:r=b"]), 9)
            .unwrap(),
        authority
            .grant(node, scopes(&["c"]), scopes(&["c"]), 9)
            .unwrap(),
        authority
            .revoke(node, BTreeMap::from([(writer, 7)]), 11)
            .unwrap(),
        authority
            .revoke(node, BTreeMap::from([(writer, 3)]), 12)
            .unwrap(),
    ];
    let records = [
        fields(json!({"r": "a"})),
        fields(json!({"r": "b"})),
        fields(json!({"r": "c"})),
    ];
    let decide = |order: &[usize]| {
        let mut in_force = Scopes::default();
        for &index in order {
            let item = &signed[index];
            in_force.insert(verifier.verify(item).unwrap(), &item.signature);
        }
        let mut decisions = Vec::new();
        for sequence in 1..10 {
            for before in &records {
                for after in &records {
                    decisions.push(in_force.judge_write(
                        &node,
                        Some((writer, sequence)),
                        "c",
                        Some(before),
                        Some(after),
                    ));
                }
            }
        }
        decisions
    };
    let first = decide(&[0, 1, 2, 3, 4]);
    for order in [
        [4, 3, 2, 1, 0],
        [2, 0, 4, 1, 3],
        [3, 1, 0, 4, 2],
        [1, 4, 3, 0, 2],
    ] {
        assert_eq!(decide(&order), first, "{order:?}");
    }
    // Without the revocations, the two grants issued at once resolve alike too.
    assert_eq!(decide(&[1, 2]), decide(&[2, 1]));
}
