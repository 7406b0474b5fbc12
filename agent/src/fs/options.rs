//! What the kernel is asked for at FUSE INIT: an image tree never changes, so the kernel may
//! skip OPEN and OPENDIR (keeping each file's page cache across opens), list directories with
//! their entries' attributes (READDIRPLUS), read up to 1 MiB a request (MAX_PAGES), send reads
//! of one file in parallel (ASYNC_READ), cache symlink targets, and look names up in one
//! directory in parallel. Each can be turned off (`--fuse-options`), to measure it on its own.

use fuse_backend_rs::abi::fuse_abi::FsOptions;

/// One option, by the name `--fuse-options` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuseOption {
    pub name: &'static str,
    pub flags: FsOptions,
    pub what: &'static str,
}

/// Every option the image filesystem can ask for.
pub const FUSE_OPTIONS: [FuseOption; 7] = [
    FuseOption {
        name: "no-open",
        flags: FsOptions::ZERO_MESSAGE_OPEN,
        what: "the kernel stops sending OPEN and RELEASE for files; their page cache is kept",
    },
    FuseOption {
        name: "no-opendir",
        flags: FsOptions::ZERO_MESSAGE_OPENDIR,
        what: "the same for directories; their listings are cached",
    },
    FuseOption {
        name: "readdirplus",
        flags: FsOptions::DO_READDIRPLUS.union(FsOptions::READDIRPLUS_AUTO),
        what: "listings carry each entry's attributes, saving a LOOKUP per entry",
    },
    FuseOption {
        name: "max-pages",
        flags: FsOptions::MAX_PAGES,
        what: "read requests of up to 1 MiB instead of 128 KiB",
    },
    FuseOption {
        name: "async-read",
        flags: FsOptions::ASYNC_READ,
        what: "reads of one file in flight together (readahead among them)",
    },
    FuseOption {
        name: "cache-symlinks",
        flags: FsOptions::CACHE_SYMLINKS,
        what: "symlink targets kept in the page cache",
    },
    FuseOption {
        name: "parallel-dirops",
        flags: FsOptions::PARALLEL_DIROPS,
        what: "lookups and listings of one directory in parallel",
    },
];

/// The options asked for: a set of [`FUSE_OPTIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuseOptions(FsOptions);

impl Default for FuseOptions {
    /// All of them: each was measured to help or cost nothing (README, "Cached reads").
    fn default() -> Self {
        Self::all()
    }
}

impl FuseOptions {
    pub fn all() -> Self {
        Self(
            FUSE_OPTIONS
                .iter()
                .fold(FsOptions::empty(), |all, option| all | option.flags),
        )
    }

    pub fn none() -> Self {
        Self(FsOptions::empty())
    }

    /// The options among `flags`.
    pub fn from_flags(flags: FsOptions) -> Self {
        Self(flags & Self::all().0)
    }

    /// What INIT asks the kernel for.
    pub fn flags(self) -> FsOptions {
        self.0
    }

    /// Whether option `name`'s flags are asked for.
    pub fn has(self, name: &str) -> bool {
        FUSE_OPTIONS
            .iter()
            .any(|o| o.name == name && self.0.contains(o.flags))
    }

    /// The names of the options asked for, in [`FUSE_OPTIONS`] order.
    pub fn names(self) -> Vec<&'static str> {
        FUSE_OPTIONS
            .iter()
            .filter(|o| self.0.contains(o.flags))
            .map(|o| o.name)
            .collect()
    }
}

impl std::str::FromStr for FuseOptions {
    type Err = String;

    /// `all`, `none`, or names joined by commas.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => return Ok(Self::all()),
            "none" => return Ok(Self::none()),
            _ => {}
        }
        let mut flags = FsOptions::empty();
        for name in s.split(',').map(str::trim) {
            let option = FUSE_OPTIONS
                .iter()
                .find(|o| o.name == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = FUSE_OPTIONS.iter().map(|o| o.name).collect();
                    format!(
                        "{name:?} is not a FUSE option: all, none, or some of {}",
                        known.join(", ")
                    )
                })?;
            flags |= option.flags;
        }
        Ok(Self(flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_by_name_and_garbage_is_refused() {
        assert_eq!("all".parse::<FuseOptions>(), Ok(FuseOptions::all()));
        assert_eq!("none".parse::<FuseOptions>(), Ok(FuseOptions::none()));
        let two: FuseOptions = "no-open, readdirplus".parse().expect("two names");
        assert_eq!(two.names(), ["no-open", "readdirplus"]);
        assert!(two.has("readdirplus") && !two.has("max-pages"));
        assert!(
            two.flags()
                .contains(FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO)
        );
        let err = "no-open,warp-speed".parse::<FuseOptions>().unwrap_err();
        assert!(
            err.contains("warp-speed") && err.contains("max-pages"),
            "{err}"
        );
        assert_eq!(FuseOptions::all().names().len(), FUSE_OPTIONS.len());
    }
}
