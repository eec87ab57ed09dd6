//! Layers given out of order are noticed from the uuids their commits record.

mod small_layer;

use std::path::{Path, PathBuf};

use blockdev::commit::CommitOptions;
use blockdev::stack::{order_problem, LowerSource};
use blockdev::{Stack, Uuid};
use small_layer::committed_layer;

/// A small committed layer with the given uuids.
fn layer(dir: &Path, name: &str, uuid: Option<Uuid>, parent: Option<Uuid>) -> PathBuf {
    let opts = CommitOptions {
        uuid,
        parent_uuid: parent,
        ..Default::default()
    };
    committed_layer(dir, name, &[], &opts)
}

fn problem(layers: &[&PathBuf]) -> Option<String> {
    let sources: Vec<LowerSource> = layers
        .iter()
        .map(|p| LowerSource::File((*p).clone()))
        .collect();
    order_problem(&Stack::open_lowers(&sources).unwrap())
}

#[test]
fn a_layer_on_another_than_its_parent_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let u = |s: &str| Uuid::from_chain_id(s).unwrap();
    let (a, b, c) = (
        u("sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        u("sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
        u("sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"),
    );
    let l0 = layer(t.path(), "l0", Some(a), None);
    let l1 = layer(t.path(), "l1", Some(b), Some(a));
    let l2 = layer(t.path(), "l2", Some(c), Some(b));
    assert_eq!(problem(&[&l0, &l1, &l2]), None);
    let p = problem(&[&l0, &l2, &l1]).expect("out of order");
    assert!(p.contains("layer 2 records its parent as"), "{p}");
    assert!(
        p.contains(&b.to_string()) && p.contains(&a.to_string()),
        "{p}"
    );
    assert!(problem(&[&l2, &l1, &l0]).is_some());
    // Layers without uuids are not compared.
    let n0 = layer(t.path(), "n0", None, None);
    let n1 = layer(t.path(), "n1", None, None);
    assert_eq!(problem(&[&n1, &n0]), None);
    assert_eq!(problem(&[&n0, &l2]), None);
}
