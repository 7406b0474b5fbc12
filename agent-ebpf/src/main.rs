//! imgstream's kernel programs. They are built for `bpfel-unknown-none` by `agent/build.rs`
//! (aya-build) and embedded in the agent; for any other target this binary is empty.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod lifecycle;
#[cfg(target_arch = "bpf")]
mod rename;

/// The programs' license, as the kernel reads it from the object: GPL-compatible, because
/// `bpf_probe_read_user_str` is a GPL-only helper.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves every path terminates, so no reachable code can panic.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
