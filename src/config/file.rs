//! The configuration file: `serve --config tensorcost.toml` (or
//! `TC_CONFIG`). Every setting of `serve` in TOML, grouped by subsystem:
//! a section per group of `serve --help`, a key per setting, named after its
//! environment variable without `TC_` and the section's own prefix
//! (`TC_TLS_CERT` is `cert` in `[tls]`, `TC_HISTORY_MAX_AGE` is
//! `history_max_age` in `[broker]`).
//!
//! The file's values become the settings' defaults, so clap's own order
//! gives the precedence: file < environment < flags. Each value is checked
//! with the setting's own parser before anything starts, and an unknown
//! section or key, or a bad value, is an error naming the file, the line
//! and the key.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Arg, Args, Command};
use toml::de::{DeTable, DeValue};

use super::Settings;

/// Longest configuration file read (a complete one is about 20 KiB).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A section: its name, the `serve --help` heading of its settings, and
/// the prefix its keys drop from their environment variable (after `TC_`).
const SECTIONS: &[(&str, &str, &str)] = &[
    ("listen", "Listeners", ""),
    ("log", "Logging", "LOG_"),
    ("tls", "TLS", "TLS_"),
    ("otlp", "Tracing", "OTLP_"),
    ("auth", "Authentication", ""),
    ("limits", "Requests", ""),
    ("broker", "Broker", ""),
    ("socketio", "Socket.IO", ""),
    ("redis", "Redis", "REDIS_"),
    ("state", "Kept state", ""),
    ("webhooks", "Webhooks", "WEBHOOK_"),
    ("mcp", "MCP", "MCP_"),
    ("policies", "Policies", "POLICY_"),
];

/// The settings a file may set: `serve`'s arguments with an environment
/// variable, except the one naming the file itself.
fn settable(command: &Command) -> impl Iterator<Item = &Arg> {
    command
        .get_arguments()
        .filter(|a| a.get_env().is_some() && a.get_id() != "config")
}

/// A setting's section and key.
fn place(arg: &Arg) -> Option<(&'static str, String)> {
    let heading = arg.get_help_heading()?;
    let &(section, _, prefix) = SECTIONS.iter().find(|(_, h, _)| *h == heading)?;
    let env = arg.get_env()?.to_str()?;
    let name = env.strip_prefix("TC_").unwrap_or(env);
    let key = name.strip_prefix(prefix).unwrap_or(name);
    Some((section, key.to_ascii_lowercase()))
}

/// `serve`'s settings as a command (what `--help` shows).
pub fn command() -> Command {
    Settings::augment_args(Command::new("serve"))
}

/// A loaded file: the value of each setting it sets, by argument id.
#[derive(Debug, Default, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    values: BTreeMap<String, String>,
}

impl ConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let meta =
            std::fs::metadata(path).with_context(|| format!("--config {shown}: cannot read it"))?;
        if meta.len() > MAX_FILE_BYTES {
            bail!("--config {shown}: larger than {MAX_FILE_BYTES} bytes: not a configuration file");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {shown}: cannot read it as UTF-8 text"))?;
        Self::parse(path, &text)
    }

    /// Checks `text`, the content of `path`.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let shown = path.display();
        let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let doc = DeTable::parse(text).map_err(|e| {
            let at = e.span().map_or(1, |s| line(s.start));
            anyhow::anyhow!("{shown}:{at}: not TOML: {}", e.message().trim())
        })?;
        let command = command();
        let mut places: BTreeMap<(&str, String), &Arg> = BTreeMap::new();
        for arg in settable(&command) {
            if let Some(place) = place(arg) {
                places.insert(place, arg);
            }
        }
        // The same settings without their environment variables: each value
        // is checked alone, with nothing else set.
        let bare = command.clone().mut_args(|a| a.env(None::<&'static str>));
        let sections: Vec<&str> = SECTIONS.iter().map(|(s, _, _)| *s).collect();
        let mut values = BTreeMap::new();
        for (name, table) in doc.get_ref() {
            let at = line(name.span().start);
            let name = name.get_ref().as_ref();
            let DeValue::Table(table) = table.get_ref() else {
                bail!(
                    "{shown}:{at}: {name}: a setting outside a section (settings go under [listen], [tls], …)"
                );
            };
            let Some(&section) = sections.iter().find(|s| **s == name) else {
                bail!(
                    "{shown}:{at}: [{name}]: unknown section (the sections are {})",
                    sections.join(", ")
                );
            };
            for (key, value) in table {
                let at = line(key.span().start);
                let key = key.get_ref().as_ref();
                let Some(arg) = places.get(&(section, key.to_string())) else {
                    let known: Vec<&str> = places
                        .keys()
                        .filter(|(s, _)| *s == section)
                        .map(|(_, k)| k.as_str())
                        .collect();
                    bail!(
                        "{shown}:{at}: [{section}] {key}: unknown setting (the [{section}] settings are {})",
                        known.join(", ")
                    );
                };
                let text = match value.get_ref() {
                    DeValue::String(s) => s.to_string(),
                    DeValue::Integer(i) => i.as_str().replace('_', ""),
                    DeValue::Float(f) => f.as_str().replace('_', ""),
                    DeValue::Boolean(b) => b.to_string(),
                    other => bail!(
                        "{shown}:{at}: [{section}] {key}: a {} is not a value of this setting (a string, a number or true/false)",
                        other.type_str()
                    ),
                };
                if let Some(reason) = refusal(&bare, arg, &text) {
                    // A secret's value is not repeated.
                    let value = if arg.is_hide_env_values_set() {
                        "(not shown)".to_string()
                    } else {
                        format!("{text:?}")
                    };
                    bail!("{shown}:{at}: [{section}] {key} = {value}: {reason}");
                }
                values.insert(arg.get_id().to_string(), text);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            values,
        })
    }

    /// Makes the file's values the defaults of `serve`'s settings in
    /// `command` (a command built with [`Settings`]' arguments).
    pub fn apply(&self, command: Command) -> Command {
        self.values.iter().fold(command, |command, (id, value)| {
            command.mut_arg(id.as_str(), |arg| arg.default_value(value.clone()))
        })
    }

    /// Whether the file sets argument `id`.
    pub fn sets(&self, id: &str) -> bool {
        self.values.contains_key(id)
    }
}

/// Why `value` is not a value of `arg`, by the setting's own parser; `None`
/// when it is one. `command`: the settings without environment variables.
fn refusal(command: &Command, arg: &Arg, value: &str) -> Option<String> {
    use clap::error::ErrorKind;
    let flag = format!("--{}={value}", arg.get_long()?);
    let e = command
        .clone()
        .try_get_matches_from(["serve", flag.as_str()])
        .err()?;
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue | ErrorKind::InvalidUtf8
    ) {
        // Not about this value (another setting it requires, say).
        return None;
    }
    let reason = std::error::Error::source(&e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_string()
        });
    Some(reason)
}

/// A value as shown by `config check`: secrets masked (a hidden setting,
/// a URL's password).
fn shown(arg: &Arg, value: &str) -> String {
    if arg.is_hide_env_values_set() {
        return "(set, not shown)".to_string();
    }
    match url::Url::parse(value) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("****"));
            url.to_string()
        }
        _ => value.to_string(),
    }
}

fn toml_value(value: &str) -> String {
    if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

/// `config check`: the effective settings (file, environment, defaults)
/// as TOML, each with where it came from.
pub fn check(file: Option<&ConfigFile>) -> anyhow::Result<String> {
    let base = command();
    let command = match file {
        Some(file) => file.apply(base),
        None => base,
    };
    let matches = command
        .clone()
        .try_get_matches_from(["serve"])
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
    // Everything the server would check before it starts.
    <Settings as clap::FromArgMatches>::from_arg_matches(&matches)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
    let mut out = String::new();
    for (section, _, _) in SECTIONS {
        out.push_str(&format!("[{section}]\n"));
        for arg in settable(&command) {
            let Some((s, key)) = place(arg) else { continue };
            if s != *section {
                continue;
            }
            let id = arg.get_id().as_str();
            let source = match matches.value_source(id) {
                Some(clap::parser::ValueSource::EnvVariable) => {
                    format!(
                        "environment {}",
                        arg.get_env().and_then(OsStr::to_str).unwrap_or("")
                    )
                }
                Some(clap::parser::ValueSource::DefaultValue)
                    if file.is_some_and(|f| f.sets(id)) =>
                {
                    "file".to_string()
                }
                Some(_) => "default".to_string(),
                None => "unset".to_string(),
            };
            match matches.get_raw(id).and_then(|mut v| v.next()) {
                Some(value) => {
                    let value = shown(arg, &value.to_string_lossy());
                    out.push_str(&format!("{key} = {}  # {source}\n", toml_value(&value)));
                }
                None => out.push_str(&format!("# {key} is unset\n")),
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// `config example`: every setting, commented out at its default, under
/// its help text.
pub fn example() -> String {
    let command = command();
    let mut out = String::from(
        "# tensorcost-events configuration: `tensorcost-events serve --config FILE`\n\
         # (or TC_CONFIG=FILE). Every setting of `serve`, at its default, commented\n\
         # out: uncomment what you change. The environment (TC_*) overrides this\n\
         # file, and flags override both. `tensorcost-events config check FILE`\n\
         # validates a file and prints the effective settings.\n",
    );
    for (section, heading, _) in SECTIONS {
        out.push_str(&format!("\n# ---- {heading} ----\n[{section}]\n"));
        for arg in settable(&command) {
            let Some((s, key)) = place(arg) else { continue };
            if s != *section {
                continue;
            }
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            out.push('\n');
            for line in wrap(&help, 76) {
                out.push_str(&format!("# {line}\n"));
            }
            let env = arg.get_env().and_then(OsStr::to_str).unwrap_or("");
            let flag = arg.get_long().unwrap_or("");
            out.push_str(&format!("# ({env}, --{flag})\n"));
            match arg.get_default_values().first() {
                Some(d) => {
                    out.push_str(&format!("#{key} = {}\n", toml_value(&d.to_string_lossy())));
                }
                None => out.push_str(&format!("#{key} = \"\"  # unset by default\n")),
            }
        }
    }
    out
}

/// `text` in lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.split("\n\n") {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_one_place_in_a_section() {
        let command = command();
        let mut seen = std::collections::HashSet::new();
        for arg in command.get_arguments() {
            if arg.get_id() == "config" || arg.get_id() == "help" {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "{} has no TC_ variable",
                arg.get_id()
            );
            let place = place(arg).unwrap_or_else(|| {
                panic!(
                    "{} (heading {:?}) has no section",
                    arg.get_id(),
                    arg.get_help_heading()
                )
            });
            assert!(seen.insert(place.clone()), "two settings at {place:?}");
        }
        assert!(seen.contains(&("tls", "cert".to_string())));
        assert!(seen.contains(&("broker", "history_max_age".to_string())));
        assert!(seen.contains(&("policies", "queue".to_string())));
    }

    #[test]
    fn the_example_parses_and_sets_nothing() {
        let example = example();
        let file = ConfigFile::parse(Path::new("example.toml"), &example).unwrap();
        assert!(file.values.is_empty());
        // Uncommented, every line is a valid setting at its default.
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => {
                    if rest.contains("# unset by default") {
                        String::new()
                    } else {
                        rest.to_string()
                    }
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file = ConfigFile::parse(Path::new("uncommented.toml"), &uncommented).unwrap();
        let with_defaults = settable(&command())
            .filter(|a| !a.get_default_values().is_empty())
            .count();
        assert_eq!(file.values.len(), with_defaults);
        assert!(with_defaults > 50, "{with_defaults}");
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let cases = [
            (
                "[tls]\ncert = \"a\"\n\n[nope]\nx = 1\n",
                "f.toml:4: [nope]: unknown section",
            ),
            (
                "[broker]\nhistory_max_agee = \"1h\"\n",
                "f.toml:2: [broker] history_max_agee: unknown setting",
            ),
            (
                "[broker]\n\nhistory_max_age = \"soon\"\n",
                "f.toml:3: [broker] history_max_age = \"soon\"",
            ),
            (
                "[listen]\ngrpc_addr = [1, 2]\n",
                "f.toml:2: [listen] grpc_addr: a array",
            ),
            (
                "[policies]\nqueue = 0\n",
                "f.toml:2: [policies] queue = \"0\": must be at least 1",
            ),
            ("[listen]\ngrpc_addr = \n", "f.toml:2: not TOML"),
            (
                "grpc_addr = \"0.0.0.0:1\"\n",
                "f.toml:1: grpc_addr: a setting outside a section",
            ),
        ];
        for (text, want) in cases {
            let err = ConfigFile::parse(Path::new("f.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
        let err = ConfigFile::load(Path::new("/nonexistent/tensorcost.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--config /nonexistent/tensorcost.toml: cannot read it"
        );
    }

    #[test]
    fn file_values_are_defaults_the_environment_and_flags_override() {
        let file = ConfigFile::parse(
            Path::new("f.toml"),
            "[broker]\nhistory_max_events = 5\n[policies]\nqueue = 7\n",
        )
        .unwrap();
        let matches = file
            .apply(command())
            .try_get_matches_from(["serve", "--policy-queue", "9"])
            .unwrap();
        let settings = <Settings as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(settings.broker.history_max_events, 5);
        assert_eq!(settings.policies.policy_queue, 9);
    }

    #[test]
    fn check_masks_secrets() {
        let file = ConfigFile::parse(
            Path::new("f.toml"),
            "[auth]\njwt_secret = \"s3cr3t-0123456789abcdef0123456789\"\n[redis]\nurl = \"redis://:hunter2@localhost:6379\"\n",
        )
        .unwrap();
        let out = check(Some(&file)).unwrap();
        assert!(!out.contains("s3cr3t") && !out.contains("hunter2"), "{out}");
        assert!(
            out.contains("jwt_secret = \"(set, not shown)\"  # file"),
            "{out}"
        );
        assert!(out.contains("url = \"(set, not shown)\"  # file"), "{out}");
    }
}
