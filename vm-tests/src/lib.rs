//! imgstream's VM tests. The guest side is the `imgstream-guest-init` binary (PID 1 of the
//! test initramfs, and the checks it runs); the host side is this library: the initramfs
//! writer, the guest kernels, the QEMU runner and the tree descriptions both sides compare.
//! `cargo xtask vm-test` and the agent's VM test scenarios use it.

pub mod initramfs;
pub mod kernels;
pub mod qemu;
pub mod tree;

/// The marker the host looks for on the serial console:
/// `IMGSTREAM-VERDICT: PASS kernel=... tests=N` or `IMGSTREAM-VERDICT: FAIL ... failed=a,b`.
pub const VERDICT: &str = "IMGSTREAM-VERDICT:";

/// Prefix of result lines the guest reports for the host to read (`IMGSTREAM-RESULT: k=v`).
pub const RESULT: &str = "IMGSTREAM-RESULT:";
