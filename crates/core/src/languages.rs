//! The languages of the one-shot runner, as data (`languages.toml`): name, aliases,
//! file extension, the template it runs in, and how to compile, run and ask its
//! version. Templates list the Debian packages they are built from (and, optionally,
//! a base template, commands and the hosts those may reach: a recipe built like an API
//! build). The language servers of the LSP bridge are data too (`[lsp.<name>]`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The list shipped with forkbox.
pub const BUILTIN: &str = include_str!("../languages.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub packages: Vec<String>,
    /// Another template of the file to build on (a copy of it), as an API build's
    /// `base`; `None`: Debian from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Commands run in a build sandbox after the packages are installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    /// Hosts the commands may reach through the egress proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
}

impl Recipe {
    /// The recipe as a template build request.
    pub fn spec(&self, name: &str) -> crate::runtime::TemplateSpec {
        crate::runtime::TemplateSpec {
            name: name.to_owned(),
            base: self.base.clone(),
            packages: self.packages.clone(),
            run: self.run.clone(),
            env: BTreeMap::new(),
            workdir: None,
            egress: (!self.egress.is_empty()).then(|| self.egress.clone()),
            context: None,
            args: BTreeMap::new(),
            keep_steps: false,
            image: None,
        }
    }
}

/// A language server the LSP bridge starts in a sandbox (`[lsp.<name>]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanguageServer {
    /// Filled in from the table's key.
    #[serde(default, skip_deserializing)]
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Shell command line speaking LSP on stdin/stdout; its first word must be on the
    /// sandbox's `PATH`.
    pub command: String,
    /// The template of the file that carries it (named in the error when a sandbox
    /// lacks it); `None`: none does, bring your own.
    #[serde(default)]
    pub template: Option<String>,
}

impl LanguageServer {
    /// The program the command starts (its first word).
    pub fn program(&self) -> &str {
        self.command.split_whitespace().next().unwrap_or("")
    }
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
    /// Run the file in the sandbox's own REPL kernel of this language (only
    /// `python`), started while the sandbox waited in the warm pool, instead of
    /// `run`: a fresh interpreter that ran nothing else, saving its start-up (~15 ms
    /// for python3). The file runs as `run` would run it: as `__main__` with its
    /// `__file__`, `sys.argv` and `sys.path[0]`, in its directory, the exit status
    /// from `SystemExit` or 1 with the traceback on stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<forkbox_types::agent::Language>,
}

impl Language {
    pub fn warmup_command(&self) -> &str {
        self.warmup.as_deref().unwrap_or(&self.version)
    }

    /// The cell that runs code file `file` in directory `dir` in this language's
    /// kernel as its `run` command would (`python3 file`), if it has one: a module of
    /// its own as `sys.modules["__main__"]` (so `import __main__` and pickling by
    /// reference work), `__file__` absolute, `sys.argv` `[file]`, `sys.path[0]` the
    /// directory, which is also the working directory.
    pub fn kernel_cell(&self, dir: &str, file: &str) -> Option<String> {
        // A JSON string is a Python string literal.
        let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let path = lit(&format!("{}/{file}", dir.trim_end_matches('/')));
        let (dir, file) = (lit(dir), lit(file));
        match self.kernel? {
            forkbox_types::agent::Language::Python => Some(format!(
                "import os as _fb_os, sys as _fb_sys, types as _fb_types\n\
                 _fb_os.chdir({dir})\n\
                 _fb_sys.path.insert(0, {dir})\n\
                 _fb_sys.argv = [{file}]\n\
                 _fb_m = _fb_types.ModuleType('__main__')\n\
                 _fb_m.__file__ = {path}\n\
                 _fb_m.__builtins__ = __builtins__\n\
                 _fb_sys.modules['__main__'] = _fb_m\n\
                 try:\n\
                 \x20   exec(compile(open({path}, 'rb').read(), {path}, 'exec'), _fb_m.__dict__)\n\
                 except SystemExit:\n\
                 \x20   raise\n\
                 except BaseException as _fb_e:\n\
                 \x20   import traceback as _fb_tb\n\
                 \x20   _fb_tb.print_exception(type(_fb_e), _fb_e, _fb_e.__traceback__.tb_next)\n\
                 \x20   raise SystemExit(1)\n"
            )),
            _ => None,
        }
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
    #[serde(default)]
    lsp: BTreeMap<String, LanguageServer>,
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
    servers: Vec<LanguageServer>,
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
            if l.kernel
                .is_some_and(|k| k != forkbox_types::agent::Language::Python)
                || (l.kernel.is_some() && l.compile.is_some())
            {
                return Err(LanguagesError::Invalid(format!(
                    "language {}: only an interpreted language may run in a kernel, and \
                     only in the python one",
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
        for (name, r) in &f.templates {
            // Bases name templates of the file, without a cycle.
            let mut seen = vec![name.as_str()];
            let mut at = r;
            while let Some(b) = &at.base {
                let Some(next) = f.templates.get(b) else {
                    return Err(LanguagesError::Invalid(format!(
                        "template {name} is built on {b}, which has no [templates.{b}] entry"
                    )));
                };
                if seen.contains(&b.as_str()) {
                    return Err(LanguagesError::Invalid(format!(
                        "template {name}: its bases go round in a circle"
                    )));
                }
                seen.push(b);
                at = next;
            }
            if !r.egress.is_empty() && r.run.is_empty() {
                return Err(LanguagesError::Invalid(format!(
                    "template {name}: egress is for run commands, and it has none"
                )));
            }
        }
        let mut servers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, mut s) in f.lsp {
            // Looked up case-insensitively.
            s.name = name.to_ascii_lowercase();
            s.aliases = s.aliases.iter().map(|a| a.to_ascii_lowercase()).collect();
            if s.program().is_empty() {
                return Err(LanguagesError::Invalid(format!(
                    "language server {}: command is empty",
                    s.name
                )));
            }
            if let Some(t) = s
                .template
                .as_ref()
                .filter(|t| !f.templates.contains_key(*t))
            {
                return Err(LanguagesError::Invalid(format!(
                    "language server {}: template {t} has no [templates.{t}] entry",
                    s.name
                )));
            }
            for n in std::iter::once(&s.name).chain(&s.aliases) {
                if !seen.insert(n.to_ascii_lowercase()) {
                    return Err(LanguagesError::Invalid(format!(
                        "the language server name {n} is used twice"
                    )));
                }
            }
            servers.push(s);
        }
        Ok(Languages {
            templates: f.templates,
            languages: f.languages,
            servers,
        })
    }

    /// A language server by name or alias, case-insensitively.
    pub fn language_server(&self, name: &str) -> Option<&LanguageServer> {
        let n = name.to_ascii_lowercase();
        self.servers
            .iter()
            .find(|s| s.name == n || s.aliases.contains(&n))
    }

    pub fn language_servers(&self) -> &[LanguageServer] {
        &self.servers
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

    /// Every template's recipe, as a build request, by template name.
    pub fn recipes(&self) -> BTreeMap<String, crate::runtime::TemplateSpec> {
        self.templates
            .iter()
            .map(|(k, r)| (k.clone(), r.spec(k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel cell run by a host python3 (as the kernel's driver runs a cell:
    /// `exec` in a namespace of its own) behaves like `python3 main.py`.
    #[test]
    fn the_python_kernel_cell_runs_the_file_as_python3_would() {
        let l = Languages::builtin().unwrap();
        let py = l.find("python").unwrap();
        assert!(l
            .find("bash")
            .unwrap()
            .kernel_cell("/tmp", "main.sh")
            .is_none());
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let run = |code: &str| {
            std::fs::write(dir.path().join("main.py"), code).unwrap();
            let cell = py.kernel_cell(d, "main.py").unwrap();
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sys\nexec(compile(sys.argv[1], '<cell>', 'exec'), \
                     {'__name__': '__main__', '__builtins__': __builtins__})",
                    &cell,
                ])
                .current_dir("/")
                .output()
                .unwrap();
            (
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
                out.status.code(),
            )
        };
        let (out, _, code) = run(
            "import os, sys, __main__\nprint(__name__, __file__ == __main__.__file__, \
             sys.argv, os.getcwd() == sys.path[0])\n1 + 1",
        );
        assert_eq!(
            (out.as_str(), code),
            ("__main__ True ['main.py'] True\n", Some(0))
        );
        assert_eq!(run("raise SystemExit(4)").2, Some(4));
        let (_, err, code) = run("\n1 / 0");
        assert_eq!(code, Some(1));
        assert!(
            err.starts_with(&format!(
                "Traceback (most recent call last):\n  File \"{d}/main.py\", line 2"
            )),
            "{err}"
        );
    }

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
        assert!(l.recipes()["compilers"]
            .packages
            .contains(&"rustc".to_owned()));
        let lsp = &l.recipes()["lsp"];
        assert_eq!(lsp.base.as_deref(), Some("python"));
        assert!(lsp.egress.is_some() && !lsp.run.is_empty());
        for (name, program) in [
            ("python", "pylsp"),
            ("py", "pylsp"),
            ("typescript", "typescript-language-server"),
            ("TS", "typescript-language-server"),
            ("go", "gopls"),
            ("rust", "rust-analyzer"),
        ] {
            assert_eq!(
                l.language_server(name).unwrap().program(),
                program,
                "{name}"
            );
        }
        assert_eq!(l.language_server("py").unwrap().name, "python");
        assert!(l.language_server("cobol").is_none());
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
        // Recipes: bases in the file and not in a circle; egress only with commands.
        let with = |extra: &str| format!("{}{extra}", lang(""));
        assert!(Languages::parse(&with("[templates.u]\npackages = []\nbase = \"t\"\n")).is_ok());
        assert!(Languages::parse(&with("[templates.u]\npackages = []\nbase = \"v\"\n")).is_err());
        assert!(Languages::parse(&with(
            "[templates.u]\npackages = []\nbase = \"w\"\n[templates.w]\npackages = []\nbase = \"u\"\n"
        ))
        .is_err());
        assert!(Languages::parse(&with(
            "[templates.u]\npackages = []\negress = [\"example.org\"]\n"
        ))
        .is_err());
        // Language servers: a command, a known template, names used once.
        assert!(Languages::parse(&with(
            "[lsp.x]\ncommand = \"xls --stdio\"\ntemplate = \"t\"\n"
        ))
        .is_ok());
        assert!(Languages::parse(&with("[lsp.x]\ncommand = \" \"\n")).is_err());
        assert!(
            Languages::parse(&with("[lsp.x]\ncommand = \"x\"\ntemplate = \"nope\"\n")).is_err()
        );
        assert!(Languages::parse(&with(
            "[lsp.x]\ncommand = \"x\"\n[lsp.y]\ncommand = \"y\"\naliases = [\"X\"]\n"
        ))
        .is_err());
    }
}
