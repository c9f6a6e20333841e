//! Golden vectors: the exact bytes of one frame of every message. A change of encoding, even
//! an accidental one (a reordered field, a new variant in the middle), fails here.

use concord_proto::*;

fn samples() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                cluster: [1; 16],
                node: [2; 16],
                node_name: "site-a".to_owned(),
                version_min: 1,
                version_max: 1,
            }),
        ),
        (
            "summary",
            Message::Summary(Summary {
                origins: vec![OriginMark {
                    origin: [3; 16],
                    contiguous: 300,
                }],
            }),
        ),
        (
            "changes",
            Message::Changes(Changes {
                changes: vec![ShippedChange {
                    origin: [4; 16],
                    sequence: 7,
                    doc: "c/1".to_owned(),
                    change: vec![0x85, 0x6f, 0x4a, 0x83],
                }],
            }),
        ),
        (
            "need_document",
            Message::NeedDocument(NeedDocument {
                doc: "c/1".to_owned(),
                have: vec![[5; 32]],
            }),
        ),
        (
            "document_changes",
            Message::DocumentChanges(DocumentChanges {
                doc: "c/1".to_owned(),
                changes: vec![vec![1, 2], vec![3]],
            }),
        ),
        (
            "range_digest",
            Message::RangeDigest(RangeDigest {
                ranges: vec![DigestRange {
                    start: "a".to_owned(),
                    end: String::new(),
                    count: 2,
                    fingerprint: [6; 32],
                }],
            }),
        ),
        (
            "document_heads",
            Message::DocumentHeads(DocumentHeads {
                leaf: "abc".to_owned(),
                documents: vec![("c/1".to_owned(), vec![[7; 32]])],
            }),
        ),
        ("ping", Message::Ping { nonce: 42 }),
        (
            "prune",
            Message::Prune {
                origins: vec![[8; 16]],
            },
        ),
        (
            "graft",
            Message::Graft {
                origins: vec![[9; 16]],
            },
        ),
        ("pong", Message::Pong { nonce: 42 }),
        ("policy_hash", Message::PolicyHash { hash: [10; 32] }),
        ("writer", Message::Writer { writer: [11; 16] }),
        (
            "log_mark",
            Message::LogMark {
                origin: [12; 16],
                contiguous: 300,
                hash: [13; 32],
            },
        ),
        (
            "covered",
            Message::Covered {
                ranges: vec![CoveredRange {
                    origin: [14; 16],
                    after: 5,
                    through: 300,
                }],
            },
        ),
        (
            "withdraw",
            Message::Withdraw {
                docs: vec!["c/1".to_owned()],
            },
        ),
        (
            "holdings",
            Message::Holdings(Holdings {
                node: [15; 16],
                name: "b".to_owned(),
                taken: 1000,
                origins: vec![OriginMark {
                    origin: [3; 16],
                    contiguous: 300,
                }],
            }),
        ),
        (
            "goodbye",
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::WrongCluster,
                detail: "cluster differs".to_owned(),
            }),
        ),
    ]
}

const GOLDEN: &[(&str, &str)] = &[
    ("hello", "0000002c000100010101010101010101010101010101010202020202020202020202020202020206736974652d610101"),
    ("summary", "000000160001010103030303030303030303030303030303ac02"),
    ("changes", "0000001e00010201040404040404040404040404040404040703632f3104856f4a83"),
    ("need_document", "0000002800010303632f31010505050505050505050505050505050505050505050505050505050505050505"),
    ("document_changes", "0000000d00010403632f31020201020103"),
    ("range_digest", "0000002800010501016100020606060606060606060606060606060606060606060606060606060606060606"),
    ("document_heads", "0000002d000106036162630103632f31010707070707070707070707070707070707070707070707070707070707070707"),
    ("ping", "000000040001072a"),
    ("pong", "000000040001082a"),
    ("goodbye", "00000014000109010f636c75737465722064696666657273"),
    ("prune", "0000001400010a0108080808080808080808080808080808"),
    ("graft", "0000001400010b0109090909090909090909090909090909"),
    ("policy_hash", "0000002300020c0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"),
    ("writer", "0000001300030d0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
    ("covered", "0000001700040f010e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e05ac02"),
    ("withdraw", "000000080004100103632f31"),
    ("holdings", "0000002a0005110f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0162e8070103030303030303030303030303030303ac02"),
    ("log_mark", "0000003500030e0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0cac020d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d"),
];

#[test]
fn every_message_encodes_to_its_golden_bytes_and_back() {
    let mut mismatches = Vec::new();
    for (name, message) in samples() {
        let frame = encode_frame(&message).unwrap();
        let actual = hex::encode(&frame);
        match GOLDEN.iter().find(|(golden_name, _)| *golden_name == name) {
            Some((_, expected)) if *expected == actual => {}
            _ => mismatches.push(format!("    (\"{name}\", \"{actual}\"),")),
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame).unwrap();
        assert_eq!(decoder.next_message().unwrap(), Some(message));
        assert_eq!(decoder.buffered(), 0);
    }
    assert!(
        mismatches.is_empty(),
        "encodings differ from the golden vectors:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn frames_split_anywhere_reassemble() {
    let frames: Vec<u8> = samples()
        .iter()
        .flat_map(|(_, message)| encode_frame(message).unwrap())
        .collect();
    let mut decoder = FrameDecoder::new();
    let mut decoded = Vec::new();
    for byte in frames {
        decoder.push(&[byte]).unwrap();
        while let Some(message) = decoder.next_message().unwrap() {
            decoded.push(message);
        }
    }
    let expected: Vec<Message> = samples().into_iter().map(|(_, message)| message).collect();
    assert_eq!(decoded, expected);
}

#[test]
fn oversized_length_is_refused_before_buffering() {
    let mut decoder = FrameDecoder::new();
    let length = (FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
    assert!(matches!(
        decoder.push(&length),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let huge = Message::DocumentChanges(DocumentChanges {
        doc: "c/1".to_owned(),
        changes: vec![vec![0; FRAME_BYTES_MAX]],
    });
    assert!(matches!(
        encode_frame(&huge),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn bad_frames_are_errors_not_panics() {
    // Unknown version.
    let mut frame = encode_frame(&Message::Ping { nonce: 1 }).unwrap();
    frame[4..6].copy_from_slice(&99u16.to_be_bytes());
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame).unwrap();
    assert_eq!(
        decoder.next_message(),
        Err(ProtoError::UnsupportedVersion { version: 99 })
    );
    // A version-2 message in a version-1 frame.
    let mut frame = encode_frame(&Message::PolicyHash { hash: [0; 32] }).unwrap();
    frame[4..6].copy_from_slice(&1u16.to_be_bytes());
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame).unwrap();
    assert!(matches!(
        decoder.next_message(),
        Err(ProtoError::Malformed(_))
    ));
    // Unknown variant, trailing bytes, too short, over a limit.
    for body in [
        &[0u8, 1, 200][..],
        &[0, 1, 7, 1, 0],
        &[0],
        &[0, 1, 9, 0, 0xff, 0x10],
    ] {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame).unwrap();
        assert!(decoder.next_message().is_err(), "{body:?}");
    }
    // Random bytes after a valid length: never a panic.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 64) as usize;
        let body: Vec<u8> = (0..len)
            .map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8)
            .collect();
        let mut frame = (len as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame).unwrap();
        let _ = decoder.next_message();
    }
}

#[test]
fn encoded_lengths_are_exact() {
    let mut messages: Vec<Message> = samples().into_iter().map(|(_, message)| message).collect();
    messages.push(Message::Changes(Changes {
        changes: (0..300u64)
            .map(|sequence| ShippedChange {
                origin: [1; 16],
                sequence: sequence * 997 + u64::from(sequence == 299) * (u64::MAX / 2),
                doc: "c/".to_owned() + &"k".repeat(sequence as usize % 200 + 1),
                change: vec![7; sequence as usize * 3],
            })
            .collect(),
    }));
    messages.push(Message::DocumentChanges(DocumentChanges {
        doc: "c/1".to_owned(),
        changes: (0..200).map(|size| vec![1; size * 5]).collect(),
    }));
    for message in messages {
        let frame = encode_frame(&message).unwrap();
        assert_eq!(message.frame_len(), frame.len(), "{message:?}");
    }
}

#[test]
fn the_largest_change_fits_a_frame_alone() {
    let change = vec![0xab; CHANGE_BYTES_MAX];
    let doc = format!("{}/{}", "c".repeat(64), "k".repeat(256));
    assert_eq!(doc.len(), DOC_KEY_BYTES_MAX);
    let shipped = Message::Changes(Changes {
        changes: vec![ShippedChange {
            origin: [1; 16],
            sequence: u64::MAX,
            doc: doc.clone(),
            change: change.clone(),
        }],
    });
    let frame = encode_frame(&shipped).unwrap();
    assert!(frame.len() <= FRAME_HEADER_BYTES + FRAME_BYTES_MAX);
    let answer = Message::DocumentChanges(DocumentChanges {
        doc,
        changes: vec![change],
    });
    encode_frame(&answer).unwrap();
    // One byte more is refused by the receiver's checks, whatever the frame.
    let over = Message::DocumentChanges(DocumentChanges {
        doc: "c/1".to_owned(),
        changes: vec![vec![0; CHANGE_BYTES_MAX + 1]],
    });
    assert!(over.check().is_err());
}

#[test]
fn clipped_text_ends_at_a_character_boundary() {
    let mut text = "é".repeat(10);
    concord_proto::clip_text(&mut text, 5);
    assert_eq!(text, "éé");
    let mut short = "ok".to_owned();
    concord_proto::clip_text(&mut short, 5);
    assert_eq!(short, "ok");
}
