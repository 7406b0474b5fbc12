//! The self-test's map cases: the programs' hash maps report being full instead of evicting
//! silently, and the agent's sweep empties what belongs to threads and cgroups that are gone.
//! Each fills a fresh load's map from userspace with entries of owners that do not exist,
//! has the kernel side try to add a real one, and sweeps.

use std::path::Path;

use super::{
    Options, SelftestError,
    scenario::{CaseResult, TestCgroup},
};
use crate::probes::{RenameProbes, StartProbes};

pub(super) fn cases(
    options: &Options,
    cgroup: &TestCgroup,
) -> Result<Vec<CaseResult>, SelftestError> {
    Ok(vec![
        rename_inflight(&options.workdir)?,
        containers(&cgroup.base)?,
    ])
}

/// The failed case of a map that took `n` entries without refusing one.
fn evicts(name: &str, n: u64) -> CaseResult {
    CaseResult {
        name: name.into(),
        passed: false,
        detail: format!("the map took {n} entries without refusing one: it evicts"),
    }
}

/// Renames a scratch file in `dir` (any rename passes through the enter program).
fn rename_once(dir: &Path, n: u32) -> Result<(), SelftestError> {
    let (from, to) = (
        dir.join(format!("map-case-{n}")),
        dir.join(format!("map-case-{n}.moved")),
    );
    std::fs::write(&from, b"x").map_err(|e| SelftestError::Prepare(from.clone(), e))?;
    std::fs::rename(&from, &to).map_err(|e| SelftestError::Prepare(to.clone(), e))?;
    let _ = std::fs::remove_file(&to);
    Ok(())
}

fn rename_inflight(dir: &Path) -> Result<CaseResult, SelftestError> {
    let mut probes = RenameProbes::attach()?;
    let name = "rename: a full in-flight map is counted, and gone threads' entries are swept";
    let filled = match probes.fill_inflight() {
        Ok(n) => n,
        Err(n) => return Ok(evicts(name, n)),
    };
    // A rename in flight during the fill may have left its slot free on its exit: take it.
    let _ = probes.fill_inflight();
    let before = probes.drops().rename_inflight_full;
    rename_once(dir, 1)?;
    let full = probes.drops().rename_inflight_full - before;
    let swept = probes.sweep();
    rename_once(dir, 2)?;
    let after_sweep = probes.drops().rename_inflight_full - before;
    Ok(CaseResult {
        name: name.into(),
        // Other renames on the node count too while the map is full; none once swept.
        passed: full >= 1 && swept as u64 >= filled && after_sweep == full,
        detail: format!(
            "{filled} made-up entries filled it; a rename then counted {full} refusal(s); the sweep removed {swept}; the next rename counted {} more",
            after_sweep - full
        ),
    })
}

fn containers(base: &Path) -> Result<CaseResult, SelftestError> {
    let mut probes = StartProbes::attach()?;
    let name = "start latency: a full cgroup map is counted, and gone cgroups' entries are swept";
    let filled = match probes.fill_containers() {
        Ok(n) => n,
        Err(n) => return Ok(evicts(name, n)),
    };
    let before = probes.drops().containers_full;
    let make = |n: u32| -> Result<(), SelftestError> {
        let dir = base.join(format!("map-case-{n}"));
        std::fs::create_dir(&dir).map_err(|e| SelftestError::Prepare(dir.clone(), e))?;
        std::fs::remove_dir(&dir).map_err(|e| SelftestError::Prepare(dir.clone(), e))
    };
    make(1)?;
    let full = probes.drops().containers_full - before;
    let swept = probes.sweep();
    make(2)?;
    let after_sweep = probes.drops().containers_full - before;
    // The second cgroup was watched, and is gone: the next sweep takes it.
    let second = probes.sweep();
    Ok(CaseResult {
        name: name.into(),
        // Other cgroups made on the node meanwhile count and are swept too.
        passed: full >= 1 && swept as u64 >= filled && after_sweep == full && second >= 1,
        detail: format!(
            "{filled} made-up cgroups filled it; a new cgroup then counted {full} refusal(s); the sweep removed {swept}; the next cgroup counted {} more and was swept ({second}) once gone",
            after_sweep - full
        ),
    })
}
