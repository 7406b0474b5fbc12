//! The virtio-fs transport against virtio-queue's mock split queue, serving a real image
//! filesystem: well-formed requests round-trip, and hostile chains (bad addresses, lengths,
//! loops, no reply buffer, garbage messages, a broken avail ring) are completed or refused
//! without taking the backend down.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, InitIn, OutHeader, ReadIn};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{
    desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;
use crate::{fs::ImageFs, testing};

const QUEUE_SIZE: u16 = 256;
/// Past the descriptor table (16 bytes an entry) and the avail ring (2 an entry).
const USED_RING: u64 = 0x4000;
const MEMORY: u64 = 8 << 20;
const FUSE_LOOKUP: u32 = 1;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;

fn content() -> Vec<u8> {
    testing::hello_content()
}

/// An image filesystem over one real eStargz layer holding `data/hello.bin`.
fn image_fs(runtime: &tokio::runtime::Runtime, dir: &Path) -> Arc<ImageFs> {
    testing::hello_image_fs(runtime, dir, Duration::ZERO)
}

fn message(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        ..Default::default()
    };
    let mut out = header.as_slice().to_vec();
    out.extend_from_slice(body);
    out
}

/// Lays out descriptor chains in guest memory, as a guest driver would.
struct Guest<'a> {
    memory: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The used ring. Not the mock's: it places its used ring after `size` bytes of avail
    /// entries instead of `size` entries, so a ring past half full overlaps them.
    used_addr: u64,
    next_desc: u16,
    next_buffer: u64,
    /// Chains submitted so far.
    submitted: usize,
}

/// One descriptor: device-readable bytes, or a device-writable buffer of some length.
enum Part {
    Readable(Vec<u8>),
    Writable(u32),
    /// A raw descriptor, exactly as given (address, length, extra flags).
    Raw(u64, u32, u16),
}

impl<'a> Guest<'a> {
    fn new(memory: &'a GuestMemoryMmap) -> Self {
        Self {
            memory,
            queue: MockSplitQueue::create(memory, GuestAddress(0), QUEUE_SIZE),
            used_addr: USED_RING,
            next_desc: 0,
            next_buffer: 0x10_0000,
            submitted: 0,
        }
    }

    fn buffer(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        assert!(self.next_buffer < MEMORY, "test guest memory exhausted");
        addr
    }

    /// Makes a chain available; returns its head and the address of its first writable buffer.
    fn submit(&mut self, parts: Vec<Part>) -> (u16, Option<u64>) {
        let head = self.next_desc;
        let count = parts.len() as u16;
        let mut reply = None;
        let mut descriptors = Vec::new();
        for (i, part) in parts.into_iter().enumerate() {
            let (addr, len, mut flags) = match part {
                Part::Readable(bytes) => {
                    let addr = self.buffer(bytes.len() as u32);
                    self.memory.write_slice(&bytes, GuestAddress(addr)).unwrap();
                    (addr, bytes.len() as u32, 0)
                }
                Part::Writable(len) => {
                    let addr = self.buffer(len);
                    reply.get_or_insert(addr);
                    (addr, len, VRING_DESC_F_WRITE as u16)
                }
                Part::Raw(addr, len, flags) => (addr, len, flags),
            };
            let index = head + i as u16;
            if (i as u16) + 1 < count {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            descriptors.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags,
                index + 1,
            )));
        }
        self.queue.add_desc_chains(&descriptors, head).unwrap();
        self.next_desc += count;
        self.submitted += 1;
        (head, reply)
    }

    /// The used ring: head -> bytes written.
    fn used(&self) -> HashMap<u16, u32> {
        let base = self.used_addr;
        let idx: u16 = self.memory.read_obj(GuestAddress(base + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let entry = base + 4 + 8 * u64::from(i % QUEUE_SIZE);
                let id: u32 = self.memory.read_obj(GuestAddress(entry)).unwrap();
                let len: u32 = self.memory.read_obj(GuestAddress(entry + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    fn reply(&self, addr: u64) -> (OutHeader, Vec<u8>) {
        let header: OutHeader = self.memory.read_obj(GuestAddress(addr)).unwrap();
        let body_len = (header.len as usize).saturating_sub(size_of::<OutHeader>());
        let mut body = vec![0u8; body_len];
        self.memory
            .read_slice(
                &mut body,
                GuestAddress(addr + size_of::<OutHeader>() as u64),
            )
            .unwrap();
        (header, body)
    }
}

struct Rig {
    backend: FsBackend<ImageFs>,
    vring: VringRwLock,
}

impl Rig {
    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// Sends one request with `reply_len` bytes of room and waits for its reply.
    fn ask(&self, guest: &mut Guest<'_>, request: Vec<u8>, reply_len: u32) -> (OutHeader, Vec<u8>) {
        let (_, reply) = guest.submit(vec![Part::Readable(request), Part::Writable(reply_len)]);
        self.kick();
        self.wait_used(guest, guest.submitted);
        guest.reply(reply.expect("a reply buffer"))
    }

    /// INIT, then LOOKUP of data/ and data/hello.bin: the file's node id.
    fn open_hello(&self, guest: &mut Guest<'_>) -> u64 {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 * 1024,
            flags: 0,
        };
        let (header, _) = self.ask(guest, message(FUSE_INIT, 1, 0, init.as_slice()), 4096);
        assert_eq!(header.error, 0, "INIT answered");
        let entry = |body: Vec<u8>| {
            EntryOut::from_slice(&body[..size_of::<EntryOut>()])
                .expect("an entry")
                .nodeid
        };
        let data = entry(
            self.ask(guest, message(FUSE_LOOKUP, 2, 1, b"data\0"), 4096)
                .1,
        );
        entry(
            self.ask(guest, message(FUSE_LOOKUP, 3, data, b"hello.bin\0"), 4096)
                .1,
        )
    }

    fn wait_used(&self, guest: &Guest<'_>, count: usize) -> HashMap<u16, u32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used = guest.used();
            if used.len() >= count {
                return used;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} chains came back",
                used.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn rig(memory: &GuestMemoryMmap, guest: &Guest<'_>, fs: Arc<ImageFs>) -> Rig {
    let atomic = GuestMemoryAtomic::new(memory.clone());
    let backend = FsBackend::new(
        Arc::new(Server::new(fs)),
        VirtioFsConfig::default(),
        Arc::new(RequestPool::start(3).unwrap()),
        Arc::default(),
    )
    .unwrap();
    backend.update_memory(atomic.clone()).unwrap();
    let vring = VringRwLock::new(atomic, QUEUE_SIZE).unwrap();
    vring
        .set_queue_info(
            guest.queue.desc_table_addr().0,
            guest.queue.avail_addr().0,
            guest.used_addr,
        )
        .unwrap();
    vring.set_queue_size(QUEUE_SIZE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    Rig { backend, vring }
}

#[test]
fn requests_round_trip_and_hostile_chains_never_take_the_backend_down() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("imgstream-virtiofs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fs = image_fs(&runtime, &dir);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap();
    let mut guest = Guest::new(&memory);
    let rig = rig(&memory, &guest, fs);

    // INIT, then LOOKUP of data/ and data/hello.bin.
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 * 1024,
        flags: 0,
    };
    let (init_head, init_reply) = guest.submit(vec![
        Part::Readable(message(FUSE_INIT, 1, 0, init.as_slice())),
        Part::Writable(4096),
    ]);
    let (dir_head, dir_reply) = guest.submit(vec![
        Part::Readable(message(FUSE_LOOKUP, 2, 1, b"data\0")),
        Part::Writable(4096),
    ]);
    rig.kick();
    let used = rig.wait_used(&guest, 2);
    let (header, _) = guest.reply(init_reply.unwrap());
    assert_eq!((header.error, header.unique), (0, 1), "INIT answered");
    assert_eq!(used[&init_head], header.len);
    let (header, body) = guest.reply(dir_reply.unwrap());
    assert_eq!(header.error, 0, "data/ found");
    assert_eq!(used[&dir_head], header.len);
    let data_dir = EntryOut::from_slice(&body[..size_of::<EntryOut>()])
        .unwrap()
        .nodeid;

    let (file_head, file_reply) = guest.submit(vec![
        Part::Readable(message(FUSE_LOOKUP, 3, data_dir, b"hello.bin\0")),
        Part::Writable(4096),
    ]);
    rig.kick();
    rig.wait_used(&guest, 3);
    let (header, body) = guest.reply(file_reply.unwrap());
    assert_eq!(header.error, 0, "hello.bin found (head {file_head})");
    let entry = *EntryOut::from_slice(&body[..size_of::<EntryOut>()]).unwrap();
    assert_eq!(entry.attr.size, content().len() as u64);

    // A read split over three writable descriptors, across chunk boundaries.
    let read = |unique, offset, size| {
        let body = ReadIn {
            fh: 0,
            offset,
            size,
            ..Default::default()
        };
        message(FUSE_READ, unique, entry.nodeid, body.as_slice())
    };
    let (read_head, read_reply) = guest.submit(vec![
        Part::Readable(read(4, 10_000, 40_000)),
        Part::Writable(size_of::<OutHeader>() as u32 + 7_000),
        Part::Writable(20_000),
        Part::Writable(13_000),
    ]);

    // Hostile chains, each alongside well-formed ones.
    let outside = MEMORY + 0x1000;
    let hostile = [
        // A header claiming a gigabyte.
        guest.submit(vec![
            Part::Readable({
                let mut m = message(FUSE_LOOKUP, 5, 1, b"data\0");
                m[..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
                m
            }),
            Part::Writable(4096),
        ]),
        // Readable bytes outside guest memory.
        guest.submit(vec![Part::Raw(outside, 64, 0), Part::Writable(4096)]),
        // A reply buffer outside guest memory.
        guest.submit(vec![
            Part::Readable(message(FUSE_LOOKUP, 6, 1, b"data\0")),
            Part::Raw(outside, 4096, VRING_DESC_F_WRITE as u16),
        ]),
        // No room for any reply.
        guest.submit(vec![Part::Readable(message(FUSE_LOOKUP, 7, 1, b"data\0"))]),
        // A descriptor of 4 GiB - 1.
        guest.submit(vec![
            Part::Raw(0x20_0000, u32::MAX, 0),
            Part::Writable(4096),
        ]),
        // A truncated header.
        guest.submit(vec![
            Part::Readable(vec![0x28, 0, 0, 0, 1, 0]),
            Part::Writable(4096),
        ]),
        // An opcode that does not exist.
        guest.submit(vec![
            Part::Readable(message(9999, 8, 1, &[])),
            Part::Writable(4096),
        ]),
        // A read asking for 4 GiB into a 4 KiB buffer.
        guest.submit(vec![
            Part::Readable(read(9, 0, u32::MAX)),
            Part::Writable(4096),
        ]),
        // A lookup of a name with no terminating NUL, and of a path with a slash.
        guest.submit(vec![
            Part::Readable(message(FUSE_LOOKUP, 10, 1, b"data")),
            Part::Writable(4096),
        ]),
        guest.submit(vec![
            Part::Readable(message(FUSE_LOOKUP, 11, 1, b"data/hello.bin\0")),
            Part::Writable(4096),
        ]),
        // An indirect table outside guest memory.
        guest.submit(vec![Part::Raw(
            outside,
            16 * 4,
            VRING_DESC_F_INDIRECT as u16,
        )]),
        // A read of an inode that was never looked up.
        guest.submit(vec![
            Part::Readable({
                let body = ReadIn {
                    size: 100,
                    ..Default::default()
                };
                message(FUSE_READ, 12, 0xdead_beef, body.as_slice())
            }),
            Part::Writable(4096),
        ]),
    ];
    // A chain whose last descriptor points back at itself.
    let looped = guest.next_desc;
    let buffer = guest.buffer(64);
    memory
        .write_slice(
            &message(FUSE_LOOKUP, 13, 1, b"data\0"),
            GuestAddress(buffer),
        )
        .unwrap();
    guest
        .queue
        .add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                buffer,
                45,
                VRING_DESC_F_NEXT as u16,
                looped,
            ))],
            looped,
        )
        .unwrap();
    guest.next_desc += 1;
    let (after_head, after_reply) = guest.submit(vec![
        Part::Readable(message(FUSE_LOOKUP, 14, 1, b"data\0")),
        Part::Writable(4096),
    ]);
    rig.kick();
    let submitted = 3 + 1 + hostile.len() + 2;
    let used = rig.wait_used(&guest, submitted);
    assert_eq!(used.len(), submitted, "every chain came back to the guest");

    // The split read holds exactly the file's bytes.
    let (header, body) = guest.reply(read_reply.unwrap());
    assert_eq!(header.error, 0);
    assert_eq!(used[&read_head], header.len);
    let mut got = body[..7_000.min(body.len())].to_vec();
    let second = read_reply.unwrap() + (size_of::<OutHeader>() as u64 + 7_000).next_multiple_of(64);
    let mut rest = vec![0u8; 33_000];
    memory
        .read_slice(&mut rest[..20_000], GuestAddress(second))
        .unwrap();
    memory
        .read_slice(
            &mut rest[20_000..],
            GuestAddress(second + 20_000u64.next_multiple_of(64)),
        )
        .unwrap();
    got.extend_from_slice(&rest);
    assert_eq!(header.len as usize, size_of::<OutHeader>() + 40_000);
    assert!(got == content()[10_000..50_000], "read bytes differ");

    // Hostile chains: nothing written, or a FUSE error reply; never a success.
    for (i, (head, reply)) in hostile.iter().enumerate() {
        let written = used[head];
        if written > 0 {
            let (header, _) = guest.reply(reply.unwrap());
            assert!(header.error < 0, "hostile chain {i} got {header:?}");
        }
    }
    let bad = rig.backend.stats().bad_requests.load(Ordering::Relaxed);
    assert!(bad >= 4, "{bad} chains counted as bad");
    // And the backend still answers.
    let (header, _) = guest.reply(after_reply.unwrap());
    assert_eq!((header.error, header.unique), (0, 14));
    assert_eq!(used[&after_head], header.len);

    // An avail ring index far beyond the queue size: logged and counted, no crash.
    let avail_idx = GuestAddress(guest.queue.avail_addr().0 + 2);
    let idx: u16 = memory.read_obj(avail_idx).unwrap();
    memory.write_obj(idx.wrapping_add(5000), avail_idx).unwrap();
    rig.kick();
    assert!(rig.backend.stats().bad_requests.load(Ordering::Relaxed) > bad);

    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_that_panics_is_answered_with_eio_and_the_backend_serves_the_next() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("imgstream-virtiofs-panic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fs = image_fs(&runtime, &dir);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap();
    let mut guest = Guest::new(&memory);
    let rig = rig(&memory, &guest, fs.clone());
    // One request at a time: its reply, once the backend has put it on the used ring.
    let file = rig.open_hello(&mut guest);
    let read = |unique| {
        let body = ReadIn {
            offset: 0,
            size: 4096,
            ..Default::default()
        };
        message(FUSE_READ, unique, file, body.as_slice())
    };
    let panics = crate::fs::REQUEST_PANICS.load(std::sync::atomic::Ordering::SeqCst);
    fs.panic_next_read
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (header, _) = rig.ask(&mut guest, read(4), 65_536);
    assert_eq!(
        (header.unique, header.error),
        (4, -libc::EIO),
        "the panicking read is answered"
    );
    assert!(crate::fs::REQUEST_PANICS.load(std::sync::atomic::Ordering::SeqCst) > panics);
    let (header, body) = rig.ask(&mut guest, read(5), 65_536);
    assert_eq!(
        (header.unique, header.error),
        (5, 0),
        "the next read is served"
    );
    assert_eq!(body, content()[..4096]);
    drop(rig);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_that_reposts_chains_waits_for_room_instead_of_growing_the_host_queue() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let dir = std::env::temp_dir().join(format!("imgstream-virtiofs-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Every range request takes two seconds: reads wait on the registry while the guest floods.
    let fs = testing::hello_image_fs(&runtime, &dir, Duration::from_secs(2));
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).expect("guest memory");
    let mut guest = Guest::new(&memory);
    let rig = rig(&memory, &guest, fs);
    let file = rig.open_hello(&mut guest);
    let answered_before = guest.submitted as u16;

    // One read chain, then its head posted again and again: each time as many entries as
    // the avail ring index allows (the backend refuses more than a queue's size ahead of
    // what it has taken), twenty times over, while the first reads wait on the registry.
    let read = ReadIn {
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let (head, reply) = guest.submit(vec![
        Part::Readable(message(FUSE_READ, 4, file, read.as_slice())),
        Part::Writable(size_of::<OutHeader>() as u32 + 4096),
    ]);
    let avail = guest.queue.avail_addr().0;
    let avail_idx = |memory: &GuestMemoryMmap| -> u16 {
        memory
            .read_obj(GuestAddress(avail + 2))
            .expect("the avail index")
    };
    let mut posted = 1usize;
    let mut peak = 0;
    for _ in 0..20 {
        let next_avail = rig.vring.get_ref().get_queue().next_avail();
        let mut idx = avail_idx(&memory);
        let allowed = QUEUE_SIZE - idx.wrapping_sub(next_avail);
        for _ in 0..allowed {
            let entry = GuestAddress(avail + 4 + 2 * u64::from(idx % QUEUE_SIZE));
            memory.write_obj(head, entry).expect("an avail entry");
            idx = idx.wrapping_add(1);
        }
        memory
            .write_obj(idx, GuestAddress(avail + 2))
            .expect("the avail index");
        posted += usize::from(allowed);
        rig.kick();
        peak = peak.max(rig.backend.stats().in_flight.load(Ordering::SeqCst));
    }
    assert!(
        peak <= u64::from(QUEUE_SIZE),
        "{peak} chains in flight on a queue of {QUEUE_SIZE}"
    );
    assert!(rig.backend.stats().deferrals.load(Ordering::SeqCst) > 0);
    assert_eq!(
        posted,
        2 * usize::from(QUEUE_SIZE),
        "the ring's index rule let the guest post a queue's size beyond what was taken"
    );

    // Once the registry answers, every chain posted comes back, the waiting ones taken as
    // room was made, and each holds the file's first 4 KiB.
    let used_idx = GuestAddress(guest.used_addr + 2);

    let expected = answered_before.wrapping_add(posted as u16);
    let deadline = Instant::now() + Duration::from_secs(30);
    // A chain is put on the used ring a moment before its slot is counted free: wait for
    // both.
    while memory.read_obj::<u16>(used_idx).expect("the used index") != expected
        || rig.backend.stats().in_flight.load(Ordering::SeqCst) != 0
    {
        assert!(
            Instant::now() < deadline,
            "not every posted chain came back: used {} of {expected}, taken {}, {} in flight",
            memory.read_obj::<u16>(used_idx).expect("the used index"),
            rig.vring.get_ref().get_queue().next_avail(),
            rig.backend.stats().in_flight.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (header, body) = guest.reply(reply.expect("a reply buffer"));
    assert_eq!(header.error, 0);
    assert!(body == content()[..4096], "read bytes differ");
    drop(rig);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_config_space_holds_the_tag_and_queue_count_and_reads_past_it_are_cut() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("imgstream-virtiofs-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fs = image_fs(&runtime, &dir);
    let backend = FsBackend::new(
        Arc::new(Server::new(fs)),
        VirtioFsConfig {
            request_queues: 2,
            tag: Some("rootfs".into()),
            ..Default::default()
        },
        Arc::new(RequestPool::start(1).unwrap()),
        Arc::default(),
    )
    .unwrap();
    let config = backend.get_config(0, 40);
    assert_eq!(&config[..6], b"rootfs");
    assert!(config[6..36].iter().all(|&b| b == 0));
    assert_eq!(config[36..], 2u32.to_le_bytes());
    assert_eq!(backend.get_config(36, 100), 2u32.to_le_bytes());
    assert!(backend.get_config(1000, 4).is_empty());
    assert!(backend.get_config(u32::MAX, u32::MAX).is_empty());
    assert!(
        backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG)
    );
    assert_eq!(backend.num_queues(), 3);
    assert_eq!(backend.queues_per_thread(), vec![1, 2, 4]);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_tags_and_queue_counts_are_refused() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("imgstream-virtiofs-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fs = image_fs(&runtime, &dir);
    let socket = std::env::temp_dir().join(format!("imgstream-vfs-{}.sock", std::process::id()));
    for config in [
        VirtioFsConfig {
            tag: Some("x".repeat(37)),
            ..Default::default()
        },
        VirtioFsConfig {
            tag: Some(String::new()),
            ..Default::default()
        },
        VirtioFsConfig {
            request_queues: 0,
            ..Default::default()
        },
        VirtioFsConfig {
            request_queues: 17,
            ..Default::default()
        },
    ] {
        let err = VirtioFsServer::bind(fs.clone(), &socket, config).unwrap_err();
        assert!(matches!(
            err,
            VirtioFsError::BadTag(_) | VirtioFsError::BadQueueCount(_)
        ));
    }
    assert!(
        !socket.exists(),
        "nothing bound for a refused configuration"
    );
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}
