//! `imgstream fuse-keeper` as a process: it stops on SIGTERM (it used to be SIGKILLed every
//! time: its signal task sat on a runtime nothing drove) and removes its socket.

mod support;

use support::FuseKeeper;

#[test]
fn the_keeper_stops_on_sigterm_and_removes_its_socket() {
    support::require_root();
    let scratch = support::scratch("fuse-keeper-term");
    let socket = scratch.join("keeper.sock");
    let keeper = FuseKeeper::start(&socket);
    let status = keeper.terminate();
    assert!(status.success(), "exited with {status}");
    assert!(!socket.exists(), "the socket went with the keeper");
    std::fs::remove_dir_all(&scratch).unwrap();
}
