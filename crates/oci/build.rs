//! Builds the ISA-L inflate shim (`src/isal_shim.c`) when Debian's `libisal-dev`
//! is installed (pkg-config `libisal`, 2.25 or newer) and sets `cfg(isal)`;
//! without it, gzip layers are inflated by zlib-rs alone (about 1.2x slower).
//! `OBD_NO_ISAL=1` at build time skips it.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/isal_shim.c");
    println!("cargo:rerun-if-env-changed=OBD_NO_ISAL");
    println!("cargo:rustc-check-cfg=cfg(isal)");
    if std::env::var_os("OBD_NO_ISAL").is_some_and(|v| v != "0") {
        return;
    }
    match pkg_config::Config::new()
        .atleast_version("2.25")
        .probe("libisal")
    {
        Ok(lib) => {
            match cc::Build::new()
                .file("src/isal_shim.c")
                .includes(&lib.include_paths)
                .warnings(true)
                .try_compile("obd_isal_shim")
            {
                Ok(()) => println!("cargo:rustc-cfg=isal"),
                Err(e) => println!(
                    "cargo:warning=cannot compile the ISA-L shim ({e}); gzip layers are \
                     inflated with zlib-rs"
                ),
            }
        }
        Err(e) => println!(
            "cargo:warning=ISA-L not found ({e}); gzip layers are inflated with zlib-rs \
             (install libisal-dev for a faster inflate)"
        ),
    }
}
