//! Layered configuration for the daemons: built-in defaults -> TOML file
//! (`--config`) -> environment (`CAPSTAN_<FLAG>`) -> flags.
//!
//! A binary has ONE struct of settings with every field an `Option`, which
//! derives both `clap::Parser` and serde:
//!
//! - clap fills it from the flags and the environment (a flag beats its
//!   variable: `#[arg(long, env = "CAPSTAN_...")]`);
//! - serde reads the same struct from the TOML file, keys being the flag
//!   names with `_` (`#[serde(deny_unknown_fields)]` makes an unknown key an
//!   error that names it), with [`load`];
//! - [`layer`] puts the command line over the file;
//! - the binary turns the result into its typed config, filling what is
//!   still unset from its defaults.
//!
//! So a setting is spelled once, as a field, instead of once per layer with
//! a hand-written merge of each.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {origin}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    /// A setting that TOML cannot hold (an integer past `i64`, ...).
    #[error("config: {0}")]
    Layer(String),
}

/// Reads the TOML file at `path`; no path: every setting unset.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, FileError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses the text of a TOML config file; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|source| FileError::Parse {
        origin: origin.to_owned(),
        source,
    })
}

/// `upper` over `lower`: every setting `upper` has (is `Some`) wins, the
/// rest comes from `lower`. Both go through their TOML form, where an unset
/// `Option` is no key at all, so this needs nothing per field.
pub fn layer<T: Serialize + DeserializeOwned>(lower: &T, upper: &T) -> Result<T, FileError> {
    let table = |t: &T| toml::Table::try_from(t).map_err(|e| FileError::Layer(e.to_string()));
    let mut merged = table(lower)?;
    merged.extend(table(upper)?);
    merged
        .try_into()
        .map_err(|e: toml::de::Error| FileError::Layer(e.to_string()))
}

/// `deserialize_with` for a list setting: a TOML list, or one string with
/// the items separated by commas as on the command line (`"a,b"`).
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(items) => items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        listen: Option<String>,
        lease_ms: Option<u64>,
        #[serde(default, deserialize_with = "one_or_many")]
        urls: Option<Vec<String>>,
    }

    #[test]
    fn the_upper_layer_wins_where_it_is_set() {
        let file = Settings {
            listen: Some("file".into()),
            lease_ms: Some(9000),
            urls: None,
        };
        let flags = Settings {
            listen: Some("flag".into()),
            ..Settings::default()
        };
        let merged = layer(&file, &flags).unwrap();
        assert_eq!(merged.listen.as_deref(), Some("flag"));
        assert_eq!(merged.lease_ms, Some(9000));
        assert_eq!(merged.urls, None);
    }

    #[test]
    fn a_list_is_a_list_or_a_comma_separated_string() {
        let one: Settings = parse("urls = \"a,b\"\n", "t.toml").unwrap();
        let many: Settings = parse("urls = [\"a\", \"b\"]\n", "t.toml").unwrap();
        assert_eq!(one.urls, many.urls);
        assert_eq!(one.urls.unwrap(), ["a", "b"]);
        let merged = layer(&many, &Settings::default()).unwrap();
        assert_eq!(merged.urls.unwrap(), ["a", "b"]);
    }

    #[test]
    fn an_unknown_key_or_a_missing_file_is_an_error_that_names_it() {
        let e = parse::<Settings>("listen_port = 3\n", "c.toml").unwrap_err();
        let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(
            text.contains("c.toml") && text.contains("listen_port"),
            "{text}"
        );
        let e = load::<Settings>(Some(Path::new("/nonexistent/c.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/c.toml"), "{e}");
        assert_eq!(load::<Settings>(None).unwrap(), Settings::default());
    }

    #[test]
    fn a_file_on_disk_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lease_ms = 7\n").unwrap();
        let s: Settings = load(Some(&path)).unwrap();
        assert_eq!(s.lease_ms, Some(7));
    }
}
