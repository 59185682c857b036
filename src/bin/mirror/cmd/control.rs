//! `mirror promote`, `mirror demote`, `mirror resolve`: failover commands for a running node,
//! sent to its control endpoint (the Unix socket beside its queue; docs/CONTROL.md).
//!
//! The library never decides *when* to fail over: these are what an operator or a cluster
//! manager (a Pacemaker or keepalived hook: docs/FAILOVER.md) runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use mirror::control::{self, control_socket_path, ControlError, DiscardNode};
use mirror::MirrorError;

use super::shared::CliResult;

/// How long a command waits for the node's answer (a promotion is quick: it persists a term).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Which running node: by its queue file (the socket is `<queue>.ctl`) or its socket.
#[derive(Args, Debug, Clone)]
pub struct NodeRef {
    /// The node's queue file
    pub queue: Option<PathBuf>,
    /// The node's control socket (default: the queue file with `.ctl` appended)
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl NodeRef {
    pub fn socket(&self) -> Result<PathBuf, MirrorError> {
        match (&self.socket, &self.queue) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(q)) => Ok(control_socket_path(q)),
            (None, None) => Err(super::shared::usage(
                "name the node: its queue file, or --socket PATH",
            )),
        }
    }
}

/// The flags of `mirror promote`.
#[derive(Args, Debug, Clone)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub node: NodeRef,
    /// Promote even while connected to a live primary, which is fenced at its first contact
    /// with this node (its pending and later writes fail)
    #[arg(long)]
    pub force: bool,
}

/// The flags of `mirror demote`.
#[derive(Args, Debug, Clone)]
pub struct DemoteArgs {
    #[command(flatten)]
    pub node: NodeRef,
}

/// The flags of `mirror resolve`.
#[derive(Args, Debug, Clone)]
pub struct ResolveArgs {
    #[command(flatten)]
    pub node: NodeRef,
    /// The node whose divergent writes are discarded (saved to a file beside its queue
    /// first): its id as `mirror status` prints it, or `local` / `peer`
    #[arg(long)]
    pub discard: String,
}

/// A control-endpoint failure as the CLI reports it (exit code 2, the node's words).
fn failed(socket: &Path, e: ControlError) -> MirrorError {
    let reason = match e {
        ControlError::Refused(r) => format!("{} ({}): {}", socket.display(), r.kind, r.message),
        other => other.to_string(),
    };
    MirrorError::Failed { reason }
}

pub fn promote(args: &PromoteArgs) -> CliResult {
    let socket = args.node.socket()?;
    let p =
        control::promote(&socket, args.force, ANSWER_TIMEOUT).map_err(|e| failed(&socket, e))?;
    println!(
        "promoted term={} forced={}",
        p.term,
        if p.forced { "yes" } else { "no" }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn demote(args: &DemoteArgs) -> CliResult {
    let socket = args.node.socket()?;
    control::demote(&socket, ANSWER_TIMEOUT).map_err(|e| failed(&socket, e))?;
    println!("demoted");
    Ok(ExitCode::SUCCESS)
}

/// The flags of `mirror events`.
#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    #[command(flatten)]
    pub node: NodeRef,
}

/// `mirror events`: the running node's events as JSON lines on stdout, following like
/// `tail -f`, until the node closes (exit 0) or stdout goes away (exit
/// [`OUTPUT_CLOSED`](super::shared::OUTPUT_CLOSED), as any command's).
pub fn events(args: &EventsArgs) -> CliResult {
    use std::io::Write;
    let socket = args.node.socket()?;
    let stdout = std::io::stdout();
    let mut write_failed = None;
    control::follow_events(&socket, ANSWER_TIMEOUT, |line| {
        let mut out = stdout.lock();
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_failed = Some(e);
                false
            }
        }
    })
    .map_err(|e| failed(&socket, e))?;
    match write_failed {
        None => Ok(ExitCode::SUCCESS),
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::from(super::shared::OUTPUT_CLOSED))
        }
        Some(source) => Err(MirrorError::Io {
            context: "writing events to stdout".into(),
            source,
        }),
    }
}

pub fn resolve(args: &ResolveArgs) -> CliResult {
    let socket = args.node.socket()?;
    let discard: DiscardNode = args
        .discard
        .parse()
        .map_err(|e: control::DiscardParseError| super::shared::usage(e.to_string()))?;
    control::resolve(&socket, discard, ANSWER_TIMEOUT).map_err(|e| failed(&socket, e))?;
    println!("resolve discard={discard} (applied at the next handshake)");
    Ok(ExitCode::SUCCESS)
}

/// `mirror status --live`: what the running node says of itself. Scripts read this output:
/// keep the labels and their order.
pub fn live_status(node: &NodeRef) -> CliResult {
    let socket = node.socket()?;
    let s = control::status(&socket, ANSWER_TIMEOUT).map_err(|e| failed(&socket, e))?;
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "no".into());
    println!("node {:#x} (live, {})", s.node_id, socket.display());
    println!("  role             {}", s.role);
    println!("  term             {}", s.term);
    println!("  phase            {}", s.phase);
    println!("  peer             {}", s.peer_description());
    println!(
        "  degraded         {}",
        if s.degraded { "yes" } else { "no" }
    );
    println!("  fenced           {}", or_none(&s.fenced));
    println!("  auth             {}", s.auth);
    println!("  split brain      {}", or_none(&s.split_brain));
    println!(
        "  queue            {} records, {} of {} bytes ({:.1}% full)",
        s.queue_records,
        s.queue_bytes,
        s.queue_capacity,
        s.queue_fill_percent()
    );
    println!("  bitmap           {}", s.bitmap_description());
    if let Some(v) = &s.last_verify {
        println!(
            "  last verify      {}: {} chunks compared, {} differing, {} repaired{}",
            v.kind,
            v.chunks_compared,
            v.chunks_differing,
            v.chunks_repaired,
            v.abandoned
                .as_deref()
                .map(|w| format!(" (ended early: {w})"))
                .unwrap_or_default()
        );
    }
    println!("  next_seq         {}", s.next_seq);
    println!("  applied_through  {}", s.applied_through);
    println!("  acked_through    {}", s.acked_through);
    println!("  writes completed {}", s.writes_completed);
    println!(
        "  last recovery    {} records, {} bytes ({} recoveries)",
        s.last_recovery_records, s.last_recovery_bytes, s.recoveries
    );
    println!("  failure          {}", or_none(&s.failure));
    Ok(ExitCode::SUCCESS)
}
