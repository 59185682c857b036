//! Real network faults between two processes in separate network namespaces joined by a veth
//! pair: the link cut (`ip link set ... down`) and healed, an nftables drop rule, and random
//! packet loss (`numgen random mod 100 < N drop`). Needs root, iproute2 and nftables; skips (and
//! says why) when they are missing, so that `cargo test` as a normal user still passes. `ci/test.sh`
//! installs nftables and runs these as root.
//!
//! The addresses are those of this test's own namespaces (10.213.<k>.1/.2), never routed outside.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Two namespaces with a veth between them; removed on drop.
struct Netns {
    primary_ns: String,
    backup_ns: String,
    backup_ip: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create(k: u32) -> Result<Netns, String> {
        let id = format!("{}-{k}", std::process::id());
        let n = Netns {
            primary_ns: format!("mirror-p-{id}"),
            backup_ns: format!("mirror-b-{id}"),
            backup_ip: format!("10.213.{k}.2"),
        };
        let (pv, bv) = (
            format!("mp{k}-{}", std::process::id() % 10000),
            format!("mb{k}-{}", std::process::id() % 10000),
        );
        sh(&["ip", "netns", "add", &n.primary_ns])?;
        sh(&["ip", "netns", "add", &n.backup_ns])?;
        sh(&[
            "ip", "link", "add", &pv, "type", "veth", "peer", "name", &bv,
        ])?;
        sh(&["ip", "link", "set", &pv, "netns", &n.primary_ns])?;
        sh(&["ip", "link", "set", &bv, "netns", &n.backup_ns])?;
        let pip = format!("10.213.{k}.1/24");
        let bip = format!("10.213.{k}.2/24");
        sh(&["ip", "-n", &n.primary_ns, "addr", "add", &pip, "dev", &pv])?;
        sh(&["ip", "-n", &n.backup_ns, "addr", "add", &bip, "dev", &bv])?;
        for (ns, dev) in [(&n.primary_ns, &pv), (&n.backup_ns, &bv)] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn backup_link(&self, up: bool) {
        let dev = self.backup_dev();
        sh(&[
            "ip",
            "-n",
            &self.backup_ns,
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }

    fn backup_dev(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.backup_ns, "-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let name = text.split(':').nth(1).unwrap().trim();
        name.split('@').next().unwrap().to_owned()
    }

    /// nftables in the backup's namespace: drop `percent`% of packets to and from the port
    /// (100: everything).
    fn drop_rule(&self, port: u16, percent: u32) {
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &self.backup_ns,
            "nft",
            "delete",
            "table",
            "inet",
            "mirrortest",
        ]);
        if percent == 0 {
            return;
        }
        let cond = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        let rules = format!(
            "table inet mirrortest {{\n chain input {{ type filter hook input priority 0; tcp dport {port} {cond}drop; }}\n chain output {{ type filter hook output priority 0; tcp sport {port} {cond}drop; }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("mirror-nft-{}.nft", std::process::id()));
        std::fs::write(&path, rules).unwrap();
        let loaded = sh(&[
            "ip",
            "netns",
            "exec",
            &self.backup_ns,
            "nft",
            "-f",
            path.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_file(&path);
        loaded.unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.primary_ns]);
        let _ = sh(&["ip", "netns", "del", &self.backup_ns]);
    }
}

fn usable() -> Result<(), String> {
    // SAFETY-free check of the effective uid via the `id` command keeps this test free of unsafe.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for tool in [["ip", "-V"], ["nft", "--version"]] {
        Command::new(tool[0])
            .arg(tool[1])
            .output()
            .map_err(|e| format!("{} not available: {e}", tool[0]))?;
    }
    Ok(())
}

fn scenario(k: u32, policy: &'static str) {
    if let Err(why) = usable() {
        eprintln!(
            "skipping the network-namespace test: {why} (ci/test.sh runs it as root with nftables)"
        );
        return;
    }
    let ns = Netns::create(k).expect("create namespaces");
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path(), policy);
    let port = 7400;
    pair.addr = format!("{}:{port}", ns.backup_ip);
    pair.netns = Some((ns.primary_ns.clone(), ns.backup_ns.clone()));
    pair.rate = 5_000;
    // Addresses other machines could reach: the pair authenticates (the secure default), so
    // the faults below also hit the authentication handshake and the tagged records.
    let key = dir.path().join("pair.key");
    std::fs::write(
        &key,
        (0..32u8)
            .map(|i| i.wrapping_mul(97) ^ 0x5c)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    pair.extra.extend([
        "--set".to_string(),
        "ack_timeout_ms=300".to_string(),
        "--set".to_string(),
        "handshake_timeout_ms=300".to_string(),
        "--set".to_string(),
        format!("secret_file={}", key.display()),
    ]);
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    let wait_more = |p: &mut Node, more: u64| {
        let from = p.num("progress", "completed");
        p.wait_until("writes", Duration::from_secs(60), |p| {
            p.num("progress", "completed") >= from + more
        });
    };
    let recovered = |p: &Node, before: u64| {
        p.num("progress", "recoveries") > before
            && p.get("progress", "phase").as_deref() == Some("synchronous")
    };
    wait_more(&mut primary, 300);
    // 1. The link goes down and comes back.
    for _ in 0..3 {
        let before = primary.num("progress", "recoveries");
        ns.backup_link(false);
        std::thread::sleep(Duration::from_millis(600));
        ns.backup_link(true);
        primary.wait_until("recovery after link down", Duration::from_secs(30), |p| {
            recovered(p, before)
        });
        wait_more(&mut primary, 100);
    }
    // 2. An nftables rule drops everything for a while.
    let before = primary.num("progress", "recoveries");
    ns.drop_rule(port, 100);
    std::thread::sleep(Duration::from_millis(800));
    ns.drop_rule(port, 0);
    primary.wait_until(
        "recovery after the drop rule",
        Duration::from_secs(30),
        |p| recovered(p, before),
    );
    // 3. Random loss: TCP retransmits; writes go on (possibly with timeouts and reconnects).
    ns.drop_rule(port, 10);
    wait_more(&mut primary, 300);
    ns.drop_rule(port, 0);
    wait_more(&mut primary, 100);
    finish_and_verify(&pair, primary, Some(backup), 0);
}

#[test]
fn link_down_drop_rule_and_random_loss_between_namespaces_with_continue() {
    scenario(1, "continue");
}

#[test]
fn link_down_drop_rule_and_random_loss_between_namespaces_with_block() {
    scenario(2, "block");
}
