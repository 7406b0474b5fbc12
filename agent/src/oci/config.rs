//! The part of an image configuration that says what a container runs: its entrypoint and
//! command, `PATH` and working directory (the OCI image spec's `config` object). Every other
//! field is ignored.

use serde::Deserialize;

/// Largest configuration read: real ones are a few kilobytes (a long build history makes
/// tens).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Directories of a `PATH` taken at most.
const MAX_PATH_DIRS: usize = 32;
/// The `PATH` runtimes give a container whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an image runs when a container does not say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Run {
    /// `Entrypoint`, then `Cmd`: the first is the program.
    pub argv: Vec<String>,
    /// `PATH` from `Env`.
    pub path: Option<String>,
    pub working_dir: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    config: Option<Container>,
}

#[derive(Deserialize)]
struct Container {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

impl Run {
    /// Reads an image configuration; an error for one that is no JSON object of that shape.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let Some(config) = serde_json::from_slice::<Document>(bytes)?.config else {
            return Ok(Self::default());
        };
        let mut argv = config.entrypoint.unwrap_or_default();
        argv.extend(config.cmd.unwrap_or_default());
        let path = config
            .env
            .unwrap_or_default()
            .into_iter()
            .rev()
            .find_map(|var| var.strip_prefix("PATH=").map(String::from));
        Ok(Self {
            argv,
            path,
            working_dir: config.working_dir.filter(|dir| !dir.is_empty()),
        })
    }

    /// Where the program may be, in the order a runtime looks: an absolute path as it is, a
    /// relative one with a slash from the working directory, a bare name in each directory of
    /// `PATH` (the runtimes' default when the image sets none). Empty when nothing runs.
    pub fn program_candidates(&self) -> Vec<String> {
        let Some(program) = self.argv.first().filter(|p| !p.is_empty()) else {
            return Vec::new();
        };
        if program.starts_with('/') {
            return vec![program.clone()];
        }
        if program.contains('/') {
            let dir = self.working_dir.as_deref().unwrap_or("/");
            let program = program.trim_start_matches("./");
            return vec![format!("{}/{program}", dir.trim_end_matches('/'))];
        }
        self.path
            .as_deref()
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|dir| dir.starts_with('/'))
            .take(MAX_PATH_DIRS)
            .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_the_entrypoints_first_word_else_the_commands_found_on_path() {
        let run = Run::parse(
            br#"{"architecture":"amd64","config":{"Entrypoint":["docker-php-entrypoint"],
                "Cmd":["apache2-foreground"],"Env":["A=1","PATH=/usr/local/bin:bin:/usr/bin/"],
                "WorkingDir":"/var/www"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .expect("a configuration");
        assert_eq!(
            run.argv,
            ["docker-php-entrypoint", "apache2-foreground"].map(String::from)
        );
        // A relative directory of PATH is skipped: the runtime resolves it against a
        // working directory the agent does not know.
        assert_eq!(
            run.program_candidates(),
            [
                "/usr/local/bin/docker-php-entrypoint",
                "/usr/bin/docker-php-entrypoint"
            ]
        );

        let run = Run::parse(br#"{"config":{"Cmd":["/usr/bin/php8.2","-r","1;"]}}"#)
            .expect("a configuration");
        assert_eq!(run.program_candidates(), ["/usr/bin/php8.2"]);
        // No PATH: the runtimes' default.
        let run = Run::parse(br#"{"config":{"Cmd":["sh"]}}"#).expect("a configuration");
        assert_eq!(run.program_candidates().len(), 6);
        assert_eq!(run.program_candidates()[5], "/bin/sh");
        let run = Run::parse(br#"{"config":{"Cmd":["./run.sh"],"WorkingDir":"/app/"}}"#)
            .expect("a configuration");
        assert_eq!(run.program_candidates(), ["/app/run.sh"]);
    }

    #[test]
    fn a_configuration_that_runs_nothing_or_is_no_configuration() {
        for nothing in [
            &br#"{}"#[..],
            br#"{"config":null}"#,
            br#"{"config":{"Cmd":[]}}"#,
            br#"{"config":{"Entrypoint":[""]}}"#,
        ] {
            let run = Run::parse(nothing).expect("a configuration");
            assert!(run.program_candidates().is_empty(), "{nothing:?}");
        }
        for hostile in [
            &b"[1,2]"[..],
            b"{\"config\":{\"Cmd\":\"sh\"}}",
            b"{\"config\":{\"Env\":[1]}}",
            b"\xff",
        ] {
            assert!(Run::parse(hostile).is_err(), "{hostile:?}");
        }
        // A PATH of thousands of directories gives a bounded list.
        let long = format!(
            r#"{{"config":{{"Cmd":["x"],"Env":["PATH={}"]}}}}"#,
            vec!["/d"; 10_000].join(":")
        );
        let run = Run::parse(long.as_bytes()).expect("a configuration");
        assert_eq!(run.program_candidates().len(), MAX_PATH_DIRS);
    }
}
