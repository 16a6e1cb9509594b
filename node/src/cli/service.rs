//! `silk service install`: a systemd unit that runs this node with its data
//! directory, restarts it when it fails, and keeps it in a sandbox (no new
//! privileges, the file system read-only but for the data directory).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

/// `silk service …`.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write a systemd unit that runs `silk run` on this data directory.
    Install(InstallArgs),
}

/// `silk service install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// A user unit (`~/.config/systemd/user`, no root needed); default: a
    /// system unit (`/etc/systemd/system`).
    #[arg(long)]
    pub user: bool,
    /// Print the unit instead of writing it.
    #[arg(long)]
    pub print: bool,
    /// Write the unit into this directory instead.
    #[arg(long)]
    pub unit_dir: Option<PathBuf>,
    /// The unit's name (`<name>.service`).
    #[arg(long, default_value = "silk")]
    pub name: String,
    /// What `silk run` gets, after `--` (for example `-- --worker`).
    #[arg(last = true)]
    pub run_args: Vec<String>,
}

/// Runs `silk service …`.
pub fn run(cmd: ServiceCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    match cmd {
        ServiceCommand::Install(args) => install(args, data_dir),
    }
}

fn install(args: InstallArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    if args.name.is_empty()
        || !args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    {
        anyhow::bail!("--name must be letters, digits, `-`, `_`, `.` or `@`");
    }
    let silk = std::env::current_exe()
        .context("cannot find the silk executable")?
        .canonicalize()
        .context("cannot resolve the silk executable's path")?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let text = unit(&silk, &data_dir, args.user, &args.run_args);
    if args.print {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = match args.unit_dir {
        Some(d) => d,
        None if args.user => std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("HOME is not set")?
            .join(".config/systemd/user"),
        None => PathBuf::from("/etc/systemd/system"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.service", args.name));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let ctl = if args.user {
        "systemctl --user"
    } else {
        "systemctl"
    };
    println!("wrote {}", path.display());
    println!(
        "start it now and at every boot:  {ctl} daemon-reload && {ctl} enable --now {}",
        args.name
    );
    println!(
        "watch it:  {} -u {} -f",
        if args.user {
            "journalctl --user"
        } else {
            "journalctl"
        },
        args.name
    );
    if args.user {
        println!("keep it running after you log out:  loginctl enable-linger $USER");
    }
    Ok(ExitCode::SUCCESS)
}

/// One word of a unit's command line: quoted when it has to be, with `%`
/// (a specifier) and `$` (a variable) escaped.
fn exec_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && escaped
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.=:,+@".contains(&b))
    {
        escaped
    } else {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The unit: `silk --data-dir DIR run ARGS`, restarted on failure, logs to
/// the journal with a line per job, in a sandbox that leaves it the data
/// directory and the devices it needs (a GPU's, TDX's).
pub fn unit(silk: &Path, data_dir: &Path, user: bool, run_args: &[String]) -> String {
    let mut exec = vec![
        exec_word(&silk.display().to_string()),
        "--data-dir".to_string(),
        exec_word(&data_dir.display().to_string()),
        "run".to_string(),
    ];
    exec.extend(run_args.iter().map(|a| exec_word(a)));
    let data = exec_word(&data_dir.display().to_string());
    let (wanted_by, network) = if user {
        ("default.target", "")
    } else {
        (
            "multi-user.target",
            "After=network-online.target\nWants=network-online.target\n",
        )
    };
    format!(
        "# Written by `silk service install`. See docs/OPERATOR.md (\"Running a node as a service\").
[Unit]
Description=silk node (confidential inference on a peer-to-peer mesh)
{network}
[Service]
Type=exec
ExecStart={exec}
Restart=on-failure
RestartSec=5
# A line per job (docs/OPERATOR.md, \"Logs\").
Environment=RUST_LOG=warn,silk_node=info
LimitNOFILE=65536
# The sandbox: no new privileges, everything read-only but the data
# directory (identity, config.toml, the payment store, models).
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy={wanted_by}
",
        exec = exec.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_that_need_it_are_quoted_and_specifiers_escaped() {
        assert_eq!(exec_word("/usr/bin/silk"), "/usr/bin/silk");
        assert_eq!(exec_word("--api=0.0.0.0:8080"), "--api=0.0.0.0:8080");
        assert_eq!(exec_word("/srv/my node"), "\"/srv/my node\"");
        assert_eq!(exec_word("50%"), "\"50%%\"");
        assert_eq!(exec_word("a\"b"), "\"a\\\"b\"");
        assert_eq!(exec_word(""), "\"\"");
    }

    /// The unit passes `systemd-analyze verify` (systemd's own checker),
    /// as a system unit and as a user unit, and holds the sandbox.
    #[test]
    fn the_unit_passes_systemd_analyze_verify() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data dir");
        std::fs::create_dir_all(&data).expect("data dir");
        // An executable that exists (verify checks ExecStart's).
        let silk = std::env::current_exe().expect("test binary");
        for user in [false, true] {
            let text = unit(&silk, &data, user, &["--worker".into()]);
            for line in [
                "Restart=on-failure",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "ExecStart=",
            ] {
                assert!(text.contains(line), "{line} missing:\n{text}");
            }
            assert!(
                text.contains(&format!("ReadWritePaths=\"{}\"", data.display())),
                "{text}"
            );
            assert!(text.ends_with(if user {
                "WantedBy=default.target\n"
            } else {
                "WantedBy=multi-user.target\n"
            }));
            let path = dir.path().join("silk.service");
            std::fs::write(&path, &text).expect("write unit");
            let mut cmd = std::process::Command::new("systemd-analyze");
            if user {
                // A user manager wants a runtime directory (a login
                // session's); a private one will do.
                let runtime = dir.path().join("runtime");
                std::fs::create_dir_all(&runtime).expect("runtime dir");
                cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
            }
            let out = cmd
                .args(["verify", "--man=no"])
                .arg(&path)
                .output()
                .expect("systemd-analyze (Debian's systemd package) must be installed");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Only what it says about this unit counts (a container's own
            // units may draw remarks of their own); an unknown key is only
            // a warning to systemd, and a failure here.
            let ours: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("silk.service"))
                .collect();
            assert!(
                out.status.success() && ours.is_empty(),
                "user {user}: {}\n{stderr}\n{text}",
                out.status
            );
        }
    }
}
