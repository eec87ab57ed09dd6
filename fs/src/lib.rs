//! ext4 inside overlaybd layers (work in progress).
