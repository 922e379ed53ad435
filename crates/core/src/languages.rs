//! The languages of the one-shot runner, as data (`languages.toml`): name, aliases,
//! file extension, the template it runs in, and how to compile, run and ask its
//! version. Templates list the Debian packages they are built from.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The list shipped with forkbox.
pub const BUILTIN: &str = include_str!("../languages.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Language {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// With the dot: `.py`.
    pub extension: String,
    /// File the code is written to; default `main` + extension.
    pub file: Option<String>,
    /// Template it runs in.
    pub template: String,
    /// Shell command that builds the program (in the code's directory), if any.
    pub compile: Option<String>,
    /// Shell command that runs it.
    pub run: String,
    /// Shell command printing the toolchain's version.
    pub version: String,
    /// Shell command a warm sandbox runs before it is handed over, so the toolchain's
    /// files are already in its page cache (default: `version`).
    pub warmup: Option<String>,
}

impl Language {
    pub fn warmup_command(&self) -> &str {
        self.warmup.as_deref().unwrap_or(&self.version)
    }

    pub fn file_name(&self) -> String {
        self.file
            .clone()
            .unwrap_or_else(|| format!("main{}", self.extension))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanguagesFile {
    templates: BTreeMap<String, Recipe>,
    languages: Vec<Language>,
}

#[derive(Debug, thiserror::Error)]
pub enum LanguagesError {
    #[error("read {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
    #[error("languages file: {0}")]
    Parse(String),
    #[error("languages file: {0}")]
    Invalid(String),
}

/// Every language and template recipe.
#[derive(Debug, Clone, Default)]
pub struct Languages {
    templates: BTreeMap<String, Recipe>,
    languages: Vec<Language>,
}

impl Languages {
    /// The shipped list.
    pub fn builtin() -> Result<Languages, LanguagesError> {
        Languages::parse(BUILTIN)
    }

    /// A list from a file (an operator's own).
    pub fn load(path: &Path) -> Result<Languages, LanguagesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LanguagesError::Read(path.to_path_buf(), e))?;
        Languages::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Languages, LanguagesError> {
        let f: LanguagesFile =
            toml::from_str(text).map_err(|e| LanguagesError::Parse(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for l in &f.languages {
            if !f.templates.contains_key(&l.template) {
                return Err(LanguagesError::Invalid(format!(
                    "language {} runs in template {}, which has no [templates.{}] entry",
                    l.name, l.template, l.template
                )));
            }
            if !l.extension.starts_with('.') {
                return Err(LanguagesError::Invalid(format!(
                    "language {}: extension must start with a dot",
                    l.name
                )));
            }
            let file = l.file_name();
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                return Err(LanguagesError::Invalid(format!(
                    "language {}: file must be a plain file name",
                    l.name
                )));
            }
            for n in std::iter::once(&l.name).chain(&l.aliases) {
                if !seen.insert(n.to_ascii_lowercase()) {
                    return Err(LanguagesError::Invalid(format!(
                        "the name {n} is used twice"
                    )));
                }
            }
        }
        Ok(Languages {
            templates: f.templates,
            languages: f.languages,
        })
    }

    /// A language by name or alias, case-insensitively.
    pub fn find(&self, name: &str) -> Option<&Language> {
        let n = name.to_ascii_lowercase();
        self.languages
            .iter()
            .find(|l| l.name == n || l.aliases.contains(&n))
    }

    pub fn all(&self) -> &[Language] {
        &self.languages
    }

    /// Packages of every template, by template name.
    pub fn recipes(&self) -> BTreeMap<String, Vec<String>> {
        self.templates
            .iter()
            .map(|(k, r)| (k.clone(), r.packages.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_list_has_the_promised_languages() {
        let l = Languages::builtin().unwrap();
        for name in [
            "python",
            "nodejs",
            "javascript",
            "typescript",
            "bash",
            "go",
            "rust",
            "c",
            "cpp",
            "java",
            "ruby",
            "php",
            "perl",
            "lua",
        ] {
            assert!(l.find(name).is_some(), "{name}");
        }
        assert_eq!(l.find("JS").unwrap().name, "nodejs");
        assert!(l.find("ruby2").is_none());
        assert_eq!(l.find("java").unwrap().file_name(), "Main.java");
        assert_eq!(l.find("c").unwrap().file_name(), "main.c");
        assert!(l.recipes()["compilers"].contains(&"rustc".to_owned()));
    }

    #[test]
    fn bad_lists_are_refused() {
        let base = "[templates.t]\npackages = []\n";
        let lang = |extra: &str| {
            format!("{base}[[languages]]\nname = \"x\"\nextension = \".x\"\ntemplate = \"t\"\nrun = \"x\"\nversion = \"x\"\n{extra}")
        };
        assert!(Languages::parse(&lang("")).is_ok());
        assert!(Languages::parse(&lang("aliases = [\"x\"]")).is_err());
        assert!(Languages::parse(&lang("file = \"../x\"")).is_err());
        assert!(Languages::parse(&lang("bogus = 1")).is_err());
        assert!(
            Languages::parse(&lang("").replace("template = \"t\"", "template = \"u\"")).is_err()
        );
    }
}
