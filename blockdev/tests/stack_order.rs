//! Layers given out of order are noticed from the uuids their commits record.

mod small_layer;

use std::path::{Path, PathBuf};

use blockdev::commit::commit_writable;
use blockdev::commit::CommitOptions;
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::stack::{order_problem, size_problem, LowerSource};
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
    order_problem(&open(layers))
}

fn open(layers: &[&PathBuf]) -> Vec<blockdev::stack::Lower> {
    let sources: Vec<LowerSource> = layers
        .iter()
        .map(|p| LowerSource::File((*p).clone()))
        .collect();
    Stack::open_lowers(&sources).unwrap()
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

/// The bottom layer naming a parent: given top first (its parent above it),
/// or with the layers below it left out. Two layers swapped were not noticed
/// (the top one, now at the bottom, was never compared).
#[test]
fn a_bottom_layer_with_a_parent_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let u = |s: &str| Uuid::from_chain_id(s).unwrap();
    let (a, b) = (
        u("sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        u("sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
    );
    let l0 = layer(t.path(), "l0", Some(a), None);
    let l1 = layer(t.path(), "l1", Some(b), Some(a));
    assert_eq!(problem(&[&l0, &l1]), None);
    assert_eq!(
        problem(&[&l1, &l0]).as_deref(),
        Some(
            format!(
                "the layers may be out of order (give them bottom first): layer 1, the bottom one, records its parent as {a}, which is layer 2 above it"
            )
            .as_str()
        )
    );
    assert_eq!(
        problem(&[&l1]).as_deref(),
        Some(
            format!(
                "a layer may be missing (give every layer, bottom first): layer 1, the bottom one, records its parent as {a}, which is not in the stack"
            )
            .as_str()
        )
    );
}

/// A committed layer of `size` bytes (virtual).
fn sized_layer(dir: &Path, name: &str, size: u64) -> PathBuf {
    let (d, i) = (dir.join(format!("{name}.d")), dir.join(format!("{name}.i")));
    let opts = CreateOptions {
        virtual_size: size,
        ..Default::default()
    };
    create_writable(&d, &i, &opts).unwrap();
    let out = dir.join(name);
    commit_writable(&d, &i, &out, &CommitOptions::default()).unwrap();
    out
}

/// Layers that record different sizes: the topmost size is the disk's (as
/// upstream), and a layer below it that is larger is reported, since what it
/// holds past the disk's end cannot be seen.
#[test]
fn a_lower_larger_than_the_disk_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let big = sized_layer(t.path(), "big", 2 << 20);
    let small = sized_layer(t.path(), "small", 1 << 20);
    let no_size = sized_layer(t.path(), "unsized", 0);
    assert_eq!(size_problem(&open(&[&small, &big])), None);
    assert_eq!(size_problem(&open(&[&big, &big, &no_size])), None);
    assert_eq!(
        size_problem(&open(&[&big, &small, &no_size])).as_deref(),
        Some(
            "the layers disagree on the disk's size: layer 1 records 2097152 bytes, layer 2 above it 1048576, and the topmost size counts (as upstream), so what layer 1 holds past byte 1048576 is not visible (are the layers in order, and all of one image?)"
        )
    );
    // Upstream's size all the same.
    let s = Stack::open(&[big, small], None).unwrap();
    assert_eq!(blockdev::BlockDevice::size(&s), 1 << 20);
}
