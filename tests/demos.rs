//! The demos `concord demo` runs, through the real binary: each converges and says so.

mod common;

use common::{concord_bare, ok};

#[test]
fn three_site_demo_converges() {
    let text = ok(concord_bare(&["demo", "--partition"]));
    assert!(text.contains("all three sites connected"), "{text}");
    assert!(text.contains("every site agrees"), "{text}");
    assert!(text.contains("stopped all sites cleanly"), "{text}");
}

/// The merged table of the table demo, as printed: from "hq and depot:" to the next section.
fn merged_table(text: &str) -> &str {
    let start = text
        .find("hq and depot:")
        .unwrap_or_else(|| panic!("{text}"));
    let end = text[start..]
        .find("\n## ")
        .map_or(text.len(), |end| start + end);
    &text[start..end]
}

/// The last table the demo prints for the edge office `paris`.
fn edge_table(text: &str) -> &str {
    let start = text.rfind("  paris:").unwrap_or_else(|| panic!("{text}"));
    let end = text[start..]
        .find("\nstopped")
        .map_or(text.len(), |end| start + end);
    &text[start..end]
}

fn check_table_demo(text: &str) {
    assert!(text.contains("both tables agree"), "{text}");
    assert!(text.contains("stopped every site cleanly"), "{text}");
    let merged = merged_table(text);
    // Customer 1: hq's email and depot's credit, both kept.
    assert!(merged.contains("ada@analytical.org"), "{text}");
    assert!(merged.contains("2750.00"), "{text}");
    assert!(merged.contains("Katherine Johnson"), "{text}");
    assert!(merged.contains("Edsger Dijkstra"), "{text}");
    assert!(!merged.contains("Alan Turing"), "{text}");
    // Applying the merge captured nothing back at either site.
    assert_eq!(
        text.matches(" 0 captured since the link came back").count(),
        2,
        "{text}"
    );
    // The edge office holds Paris's customers and no other: 1 moved in, 4 moved out, and 7,
    // which it wrote outside its grant, stayed in its quarantine.
    assert!(
        text.contains("paris started and received only customer 4"),
        "{text}"
    );
    let edge = edge_table(text);
    assert!(edge.contains("Ada Lovelace"), "{text}");
    assert!(edge.contains("Marie Curie"), "{text}");
    assert!(edge.contains("Hokusai"), "{text}");
    assert!(!edge.contains("Katherine Johnson"), "{text}");
    assert!(!edge.contains("Grace Hopper"), "{text}");
    assert!(
        text.contains("customer 7 stays in paris's quarantine"),
        "{text}"
    );
}

#[test]
fn table_demo_converges_on_sqlite() {
    let text = ok(concord_bare(&["demo", "--sqlite-only"]));
    assert!(!text.contains("PostgreSQL database"), "{text}");
    check_table_demo(&text);
}

#[test]
fn table_demo_converges_with_postgres_where_available() {
    let text = ok(concord_bare(&["demo"]));
    if text.contains("PostgreSQL is not reachable") {
        assert!(
            std::env::var_os("CONCORD_REQUIRE_POSTGRES").is_none(),
            "PostgreSQL is required here (CONCORD_REQUIRE_POSTGRES): {text}"
        );
        eprintln!("SKIPPED the PostgreSQL half of the table demo: {text}");
    } else {
        assert!(text.contains("PostgreSQL database concord_demo_"), "{text}");
    }
    check_table_demo(&text);
}

#[test]
fn cli_demo_runs() {
    let output = concord_bare(&["demo", "--cli"]);
    let text = ok(output);
    assert!(text.contains("$ concord get customers/44"));
    assert!(text.contains("\"name\":\"Grace Hopper\""));
}
