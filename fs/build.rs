//! Link the system libext2fs (Debian `libext2fs-dev`) and com_err.
//! The Rust declarations are pre-generated in `src/ext2fs/sys.rs`, so no
//! libclang is needed here.
fn main() {
    println!("cargo:rustc-link-lib=dylib=ext2fs");
    println!("cargo:rustc-link-lib=dylib=com_err");
    println!("cargo:rerun-if-changed=build.rs");
}
