//! Image conversion (work in progress).
