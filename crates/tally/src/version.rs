//! `tally version` and `tally --version`.
//!
//! The git commit is what the build environment put in `TALLY_GIT_COMMIT`
//! (`TALLY_GIT_COMMIT=$(git rev-parse HEAD) cargo build --release -p
//! tally`); without it the commit is `unknown`. No build script runs git.
//! The server's version is the one its `/openapi.json` states.

use std::sync::LazyLock;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tally_client::TallyClient;

use crate::output;

/// The client's version (the workspace's package version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit of the build, when the build environment gave it.
pub const GIT_COMMIT: Option<&str> = option_env!("TALLY_GIT_COMMIT");

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Only the client's version; do not ask the server.
    #[arg(long)]
    pub client: bool,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = VersionFormat::Text, value_name = "FORMAT")]
    pub output: VersionFormat,
}

/// Output formats of `tally version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionFormat {
    /// `Key: value` lines.
    Text,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// The client's build.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientVersion {
    version: &'static str,
    git_commit: &'static str,
    /// `arch-os[-env]`, e.g. `x86_64-linux-gnu`.
    target: String,
}

/// What a server said about itself.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerVersion {
    url: String,
    version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Versions {
    client_version: ClientVersion,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_version: Option<ServerVersion>,
}

fn target() -> String {
    let mut target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
    let env = if cfg!(target_env = "gnu") {
        "gnu"
    } else if cfg!(target_env = "musl") {
        "musl"
    } else if cfg!(target_env = "msvc") {
        "msvc"
    } else {
        ""
    };
    if !env.is_empty() {
        target.push('-');
        target.push_str(env);
    }
    target
}

fn client_version() -> ClientVersion {
    ClientVersion {
        version: VERSION,
        git_commit: GIT_COMMIT.unwrap_or("unknown"),
        target: target(),
    }
}

/// `--version`'s long text: version, commit and target.
pub fn long() -> &'static str {
    static LONG: LazyLock<String> = LazyLock::new(|| {
        let client = client_version();
        format!(
            "{} (commit {}, {})",
            client.version, client.git_commit, client.target
        )
    });
    &LONG
}

fn render(versions: &Versions, format: VersionFormat) -> anyhow::Result<String> {
    Ok(match format {
        VersionFormat::Json => output::to_json(versions)?,
        VersionFormat::Yaml => output::to_yaml(versions)?,
        VersionFormat::Text => {
            let c = &versions.client_version;
            let mut out = format!(
                "Client Version: {}\nGit Commit:     {}\nTarget:         {}\n",
                c.version, c.git_commit, c.target
            );
            if let Some(s) = &versions.server_version {
                out.push_str(&format!("Server Version: {} ({})\n", s.version, s.url));
            }
            out
        }
    })
}

/// `tally version --client`.
pub fn print_client(format: VersionFormat) -> anyhow::Result<()> {
    let versions = Versions {
        client_version: client_version(),
        server_version: None,
    };
    crate::print(&render(&versions, format)?)
}

/// `tally version`: the client's, then the server's when it answers (a
/// warning on standard error when it does not; the exit status stays 0).
pub async fn run(client: &TallyClient, args: VersionArgs) -> anyhow::Result<()> {
    let server_version = match client.server_version().await {
        Ok(version) => Some(ServerVersion {
            url: client.base_url().to_owned(),
            version,
        }),
        Err(e) => {
            eprintln!("warning: no server version: {e}");
            None
        }
    };
    let versions = Versions {
        client_version: client_version(),
        server_version,
    };
    crate::print(&render(&versions, args.output)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_version_commit_target_and_server() {
        let versions = Versions {
            client_version: ClientVersion {
                version: "1.2.3",
                git_commit: "abc123",
                target: "x86_64-linux-gnu".into(),
            },
            server_version: Some(ServerVersion {
                url: "http://127.0.0.1:8080/".into(),
                version: "1.2.0".into(),
            }),
        };
        assert_eq!(
            render(&versions, VersionFormat::Text).unwrap(),
            "Client Version: 1.2.3\nGit Commit:     abc123\nTarget:         x86_64-linux-gnu\n\
             Server Version: 1.2.0 (http://127.0.0.1:8080/)\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&versions, VersionFormat::Json).unwrap()).unwrap();
        assert_eq!(json["clientVersion"]["gitCommit"], "abc123");
        assert_eq!(json["serverVersion"]["version"], "1.2.0");
        assert!(long().starts_with(VERSION), "{}", long());
        assert!(target().starts_with(std::env::consts::ARCH));
    }
}
