//! Struct field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya's Rust eBPF has no CO-RE, so the one kernel-struct walk the lifecycle programs make
//! (`current->files->fdt->fd[n]->f_inode->i_mode`) takes its offsets from here, written into
//! a map before the programs attach. Only what that needs is parsed: the type section's
//! records, struct and union members (through anonymous members), and names.

use imgstream_ebpf::KernelOffsets;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Errors reading BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {0}")]
    Read(String, #[source] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {0} has no member {1} in BTF")]
    NoMember(String, String),
}

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// The type a typedef or qualifier refers to (`size_or_type`).
    refers: u32,
    members: Vec<Member>,
}

/// The parsed types of one BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| BtfError::Read(path.into(), e))?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| data.get(start..end))
                .ok_or(BtfError::Malformed("section outside the blob"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            refers: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let refers = u32_at(type_data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => 0,
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                refers,
                members,
            });
        }
        Ok(Self { strings, types })
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let candidates: Vec<usize> = self
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == KIND_STRUCT && self.name(t.name) == name)
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            return Err(BtfError::NoStruct(name.into()));
        }
        candidates
            .into_iter()
            .find_map(|id| self.find_member(id, member, 0))
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find_member(&self, type_id: usize, member: &str, depth: usize) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let ty = self.types.get(type_id)?;
        for m in &ty.members {
            if self.name(m.name) == member {
                return Some(m.bit_offset);
            }
        }
        // Anonymous members: struct { ... }; union { ... };
        for m in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(m.type_id as usize);
            if let Some(offset) = self.find_member(inner, member, depth + 1) {
                return Some(m.bit_offset + offset);
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: usize) -> usize {
        const TYPEDEF_AND_QUALIFIERS: [u32; 5] = [8, 9, 10, 11, 18];
        for _ in 0..16 {
            match self.types.get(id) {
                Some(t) if TYPEDEF_AND_QUALIFIERS.contains(&t.kind) => id = t.refers as usize,
                _ => return id,
            }
        }
        id
    }
}

/// The offsets the log-line check needs, from the running kernel's BTF.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_kernel()?;
    Ok(KernelOffsets {
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdtable_fd: btf.member_offset("fdtable", "fd")?,
        file_inode: btf.member_offset("file", "f_inode")?,
        inode_mode: btf.member_offset("inode", "i_mode")?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_the_offsets_the_log_check_needs() {
        let Ok(offsets) = kernel_offsets() else {
            // Without /sys/kernel/btf/vmlinux the agent counts every write; nothing to check.
            assert!(!std::path::Path::new("/sys/kernel/btf/vmlinux").exists());
            return;
        };
        assert_eq!(offsets.valid, 1);
        // inode.i_mode is the first member of struct inode in every kernel since 2.6.
        assert_eq!(offsets.inode_mode, 0);
        // fdtable starts with max_fds (unsigned int), then the fd array pointer.
        assert_eq!(offsets.fdtable_fd, 8);
        assert!(offsets.task_files > 0 && offsets.task_files < 16384);
    }

    #[test]
    fn hostile_blobs_are_errors() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 255, 255, 255, 255]).is_err());
        let mut header = vec![0x9f, 0xeb, 1, 0];
        header.extend_from_slice(&24u32.to_le_bytes());
        for v in [0u32, u32::MAX, 0, 4] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        assert!(Btf::parse(&header).is_err());
    }
}
