//! A writable layer is claimed by the open that writes it: a second writer, or
//! a reader (a commit) while it is written, is refused with a message naming
//! the data file; readers share it; the claim ends with the open.

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};

#[test]
fn one_writer_or_many_readers() {
    let t = tempfile::tempdir().unwrap();
    for sparse in [false, true] {
        let (d, i) = (
            t.path().join(format!("d{sparse}")),
            t.path().join(format!("i{sparse}")),
        );
        create_writable(
            &d,
            &i,
            &CreateOptions {
                virtual_size: 1 << 20,
                sparse,
                ..Default::default()
            },
        )
        .unwrap();
        let busy = |r: Result<WritableLayer, blockdev::Error>, what: &str| {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("{what}: opened"))
                .to_string();
            assert!(
                e.contains("in use") && e.contains(&*d.to_string_lossy()),
                "{what}: {e}"
            );
        };
        let w = WritableLayer::open(&d, &i).unwrap();
        busy(WritableLayer::open(&d, &i), "a second writer");
        busy(WritableLayer::open_read_only(&d, &i), "a reader");
        let out = t.path().join(format!("c{sparse}"));
        let e = commit_writable(&d, &i, &out, &CommitOptions::default()).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(!out.exists());
        drop(w);
        let r1 = WritableLayer::open_read_only(&d, &i).unwrap();
        let r2 = WritableLayer::open_read_only(&d, &i).unwrap();
        busy(WritableLayer::open(&d, &i), "a writer while read");
        drop((r1, r2));
        WritableLayer::open(&d, &i).unwrap();
    }
}
