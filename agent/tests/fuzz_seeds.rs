//! Every committed fuzz seed (`agent/fuzz/seeds/<target>`) and every input a fuzzer once found
//! (`agent/fuzz/regressions/<target>`, where `cargo xtask fuzz` puts them) through its
//! target's check, on a tokio worker's 2 MiB stack, on stable Rust: hostile TOCs (deep and
//! long paths, huge chunk claims, one digest with two sizes, non-ASCII times), tar streams
//! (PAX pile-ups, sizes that overflow their padding, truncations) and manifests must be
//! refused or pass the checks, never panic or overflow the stack.

use std::path::Path;

use imgstream::fuzzing::{TARGETS, on_worker_stack};

#[test]
fn every_seed_and_found_input_passes_its_check_on_a_worker_stack() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut checked = Vec::new();
    for (target, check) in TARGETS {
        for kind in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a directory entry").path();
                let data = std::fs::read(&path).expect("a committed input");
                let run = std::panic::catch_unwind(|| on_worker_stack(check, &data));
                assert!(run.is_ok(), "{} fails its check", path.display());
                checked.push(path);
            }
        }
    }
    // Every target has seeds, hostile ones among them.
    for (target, _) in TARGETS {
        let hostile = checked
            .iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with(target)))
            .filter(|p| p.to_string_lossy().contains("hostile"))
            .count();
        assert!(hostile > 0, "no hostile seed for {target}");
    }
}
