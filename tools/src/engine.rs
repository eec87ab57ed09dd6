//! `--engine` and its options, shared by the tools that make filesystems and
//! apply layers (overlaybd-apply, overlaybd-create, the convertor).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cli::{self, UsageExt};
use anyhow::Context;
use obdfs::Engine;
use obdkernel::{Kernel, KernelOptions};

/// Whether `engine` makes its ext4 with libext2fs ([`mod@obdfs::mkfs`], at most
/// [`obdfs::mkfs::MAX_SIZE`]): any but the kernel engine, so also the
/// libext2fs engine that `--engine kernel --engine-fallback` fell back to.
pub fn mkfs_by_libext2fs(engine: &dyn Engine) -> bool {
    engine.name() != obdkernel::NAME
}

/// Call first thing in `main` of a tool with `--engine`, before any thread
/// starts: the kernel engine's watchdog (which cleans up after a SIGKILL) is
/// the tool itself started again, and in that process this serves as the
/// watchdog and exits ([`obdkernel::watchdog`]).
pub fn init_watchdog() {
    obdkernel::watchdog::init();
}

/// Which apply engine.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// mkfs and apply in userspace through libext2fs: no mount, no root.
    #[default]
    Libext2fs,
    /// `mkfs.ext4` and the kernel's ext4: the layer exposed through FUSE,
    /// loop-mounted, the tar unpacked into the mount (needs root).
    Kernel,
}

/// The engine options of a tool.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EngineArgs {
    /// How the filesystem is made and layers applied: `libext2fs`
    /// (userspace, no root) or `kernel` (the layer exposed through FUSE,
    /// `mkfs.ext4`, a loop mount and the kernel's ext4; needs root,
    /// /dev/fuse and loop devices).
    #[arg(long, value_enum, default_value_t = EngineKind::Libext2fs)]
    pub engine: EngineKind,
    /// Kernel engine: more `mkfs.ext4` options (space-separated), after
    /// upstream's `-O ^has_journal,sparse_super,flex_bg -G 1 -E discard -F`
    /// and a fixed UUID and hash seed.
    #[arg(long = "mkfs-options", value_name = "OPTS", allow_hyphen_values = true)]
    pub mkfs_options: Option<String>,
    /// Kernel engine: `mount -o` options (comma-separated; default
    /// `discard`, as upstream).
    #[arg(long = "mount-options", value_name = "OPTS")]
    pub mount_options: Option<String>,
    /// Use the libext2fs engine when the kernel engine is not available
    /// here (no root, no /dev/fuse, no loop devices) instead of failing.
    #[arg(long = "engine-fallback")]
    pub fallback: bool,
}

impl EngineArgs {
    /// The engine asked for, stopping when `cancel` is set (for a tool
    /// that handles signals itself). `fstype` is `ctr obdconv`'s form
    /// `ext4;MOUNT_OPTS;MKFS_OPTS`, for the kernel engine.
    pub fn build_with(
        &self,
        tool: &'static str,
        cancel: Arc<AtomicBool>,
        fstype: Option<&str>,
    ) -> anyhow::Result<Arc<dyn Engine>> {
        if self.engine == EngineKind::Libext2fs {
            if self.mkfs_options.is_some() || self.mount_options.is_some() {
                crate::usage_bail!("--mkfs-options and --mount-options need --engine kernel");
            }
            if let Some(f) = fstype {
                crate::usage_bail!("--fstype '{f}' (mount and mkfs options) needs --engine kernel");
            }
            return Ok(Arc::new(obdfs::Libext2fs::default()));
        }
        let mut opts = KernelOptions {
            mkfs_options: self
                .mkfs_options
                .as_deref()
                .map(obdkernel::split_words)
                .unwrap_or_default(),
            mount_options: self.mount_options.clone(),
            cancel: Some(cancel),
            ..Default::default()
        };
        if let Some(f) = fstype {
            opts = opts.with_fstype(f).context("--fstype").usage()?;
        }
        match Kernel::new(opts) {
            Ok(k) => Ok(Arc::new(k)),
            Err(e @ obdkernel::Error::Unavailable { .. }) if self.fallback => {
                cli::say(format_args!(
                    "{tool}: {e}; using the libext2fs engine (--engine-fallback)"
                ));
                Ok(Arc::new(obdfs::Libext2fs::default()))
            }
            Err(e) => Err(e).context("--engine kernel"),
        }
    }
}
