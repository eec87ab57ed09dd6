//! EROFS (Enhanced Read-Only File System) images: a writer that builds
//! TurboOCI layer metadata from OCI layer tars the way upstream overlaybd
//! does (`turboOCI-apply --fstype erofs`, erofs-utils in "tar, reserved
//! space" mode), and a reader.
//!
//! # On-disk layout
//!
//! Everything is little endian; the block size is 4 KiB here (2^`blkszbits`).
//!
//! * **Superblock**: 128 bytes at byte 1024 of block 0: magic `E0F5E1E2`,
//!   checksum (only with the `SB_CHKSUM` compat feature), feature bits,
//!   `blkszbits`, `root_nid` (16 bits), inode count, `build_time` (the
//!   mtime of every compact inode), `blocks`, `meta_blkaddr` (where nid 0
//!   lives), `xattr_blkaddr` (shared xattrs), uuid, volume name, and the
//!   packed-inode / long-xattr-prefix / device-table fields.
//! * **Inodes** live in the metadata area, 32-byte aligned; an inode's
//!   *nid* is `(byte offset - meta_blkaddr * blksz) / 32`. Two forms:
//!   *compact* (32 bytes: `i_format`, `i_xattr_icount`, 16-bit mode,
//!   nlink, uid, gid, 32-bit size, `i_u`, `i_ino`; mtime = build time) and
//!   *extended* (64 bytes: 32-bit uid/gid/nlink, 64-bit size, mtime +
//!   nsec). `i_format` bit 0 is the form, bits 1..3 the data layout; `i_u`
//!   is the first data block, the encoded device number, or the chunk
//!   format.
//! * **Inline xattrs** follow the inode: a 12-byte header (name filter,
//!   shared count, reserved), 4-byte shared-xattr ids (entries at
//!   `xattr_blkaddr * blksz + 4 * id`), then entries `{name_len, name_index,
//!   value_size(16), name suffix, value}` each padded to 4 bytes. The name
//!   index selects a prefix (1 `user.`, 2 `system.posix_acl_access`, 3
//!   `system.posix_acl_default`, 4 `trusted.`, 6 `security.`; bit 7: a long
//!   prefix from the superblock's table). The area's size is
//!   `12 + 4 * (i_xattr_icount - 1)`; unused space is zero.
//! * **Data layouts**: *flat plain* (all data in contiguous blocks from
//!   `i_u`), *flat inline* (the same, but the last partial block follows
//!   the inode and its xattrs in the same metadata block), *chunk-based*
//!   (a 4-byte block map or 8-byte chunk indexes `{advise, device_id,
//!   blkaddr}` follow the xattrs, 4/8-aligned; `0xFFFFFFFF` = hole), and
//!   two compressed layouts this crate does not read.
//! * **Directories** are files of blocks; each block starts with 12-byte
//!   dirents `{nid(64), nameoff(16), file_type, reserved}` followed by the
//!   names (not NUL-terminated; the last name of a block ends at the first
//!   NUL or the block end). Names are sorted (strcmp) within and across
//!   blocks, `.` and `..` included.
//!
//! # What the writer produces (upstream's choices, mirrored)
//!
//! Regular-file data is never copied: each file gets contiguous, block
//! aligned *reserved* blocks in the device address space, which become a
//! target mapping into the layer tar (LSMT tag 1). Everything else (the
//! superblock, inodes, xattrs, directories, symlinks) is metadata written
//! to the device. Block allocation follows erofs-utils' buffer manager
//! ([`bufmgr`]); the bottom layer reserves 16 KiB of xattr space in the
//! root inode so that later layers can rewrite the root in place. A later
//! layer appends after the lower image: it rebuilds every directory the
//! tar touches (merging the lower directory's entries), keeps untouched
//! subtrees by nid, fixes the `..` of reused directories in place, copies
//! its new root inode over the old one, and rewrites the superblock. See
//! [`writer`] for the details and the deliberate differences.

pub mod bufmgr;
pub mod error;
pub mod format;
pub mod overlay;
pub mod reader;
pub mod writer;

pub use error::{Error, Result};
pub use reader::{DirEntry, ErofsReader, Extent, Inode, VerifyLimits, VerifyStats};
pub use writer::{build_layer, build_layer_with_progress, BuildOptions, BuildStats};
