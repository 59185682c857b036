//! `mirror status`: what a node's queue file says (the node may be running or stopped).
//!
//! Scripts and tests read this output: keep the labels and their order.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use mirror::MirrorError;

use super::shared::CliResult;

/// The flags of `mirror status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Queue file
    pub queue: PathBuf,
    /// Ask the running node (its control socket, `<queue>.ctl`) instead of reading the file:
    /// role, term, phase, peer, degraded, fenced, split brain, queue fill, last recovery
    #[arg(long)]
    pub live: bool,
}

pub fn run(args: &StatusArgs) -> CliResult {
    if args.live {
        return super::control::live_status(&super::control::NodeRef {
            queue: Some(args.queue.clone()),
            socket: None,
        });
    }
    let queue: &Path = &args.queue;
    let i = mirror::node::inspect(queue)?;
    println!("queue {}", queue.display());
    println!("  format_version   {}", i.format_version);
    println!(
        "  role             {}{}",
        i.role,
        if i.superseded {
            " (superseded: fenced by a newer primary; refused as a primary until it rejoins)"
        } else {
            ""
        }
    );
    println!("  node_id          {:#x}", i.node_id);
    println!(
        "  bound peer       {}",
        if i.peer_node_id == 0 {
            "none yet".to_string()
        } else {
            format!("{:#x}", i.peer_node_id)
        }
    );
    println!("  region_size      {} bytes", i.region_size);
    println!("  capacity         {} bytes", i.capacity_bytes);
    println!(
        "  records          {} ({} bytes, {:.1}% full)",
        i.records,
        i.bytes,
        100.0 * i.bytes as f64 / i.capacity_bytes.max(1) as f64
    );
    match i.first_seq {
        Some(f) => println!("  seqs held        {f}..={}", i.last_seq),
        None => println!("  seqs held        none (last seq {})", i.last_seq),
    }
    println!("  applied_through  {}", i.applied_through);
    println!("  next_seq         {}", i.next_seq);
    println!("  current_term     {}", i.current_term);
    let history: Vec<String> = i
        .term_history
        .entries()
        .iter()
        .map(|e| format!("term {} from seq {}", e.term, e.first_seq))
        .collect();
    println!(
        "  term history     {}",
        if history.is_empty() {
            "empty".to_string()
        } else {
            history.join(", ")
        }
    );
    // Divergent suffixes this node dropped (saved before the repair removed them).
    for path in mirror_storage::list_discarded(queue).map_err(MirrorError::from)? {
        match mirror_storage::read_discarded(&path) {
            Ok(d) => println!(
                "  discarded        {} records after seq {} ({} bytes) in {}",
                d.records.len(),
                d.common_seq,
                d.records.iter().map(|r| r.payload.len()).sum::<usize>(),
                path.display()
            ),
            Err(e) => println!("  discarded        {} (unreadable: {e})", path.display()),
        }
    }
    if i.torn_tail_cut_bytes > 0 {
        println!(
            "  torn tail        {} bytes would be cut at the next open ({:?})",
            i.torn_tail_cut_bytes, i.cut_reason
        );
    }
    match mirror_storage::inspect_bitmap(&mirror_storage::bitmap_path(queue)) {
        Ok(b) => println!(
            "  bitmap           {} dirty chunks of {} bytes{}{}{}",
            b.dirty_chunks,
            b.geometry.chunk_size(),
            if b.covers_from != 0 {
                format!(", covering folded seqs from {}", b.covers_from)
            } else {
                String::new()
            },
            match b.resync_target {
                Some(p) =>
                    format!("; a resync or catch-up into this node from {p:#x} is unfinished"),
                None => String::new(),
            },
            if b.damaged_pages > 0 || b.state_damaged {
                format!(
                    "; damaged ({} pages, state {}): the next open takes them as dirty",
                    b.damaged_pages, b.state_damaged
                )
            } else {
                String::new()
            }
        ),
        Err(mirror_storage::StorageError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            println!("  bitmap           none yet")
        }
        Err(e) => println!("  bitmap           unreadable: {e}"),
    }
    println!(
        "  in use           {}",
        if i.in_use {
            "yes (a running node holds it; figures are a snapshot)"
        } else {
            "no"
        }
    );
    if i.in_use {
        // What only the running node knows (its configuration), if it answers at once.
        let socket = mirror::control::control_socket_path(queue);
        if let Ok(s) = mirror::control::status(&socket, std::time::Duration::from_millis(500)) {
            println!("  auth             {} (said by the running node)", s.auth);
        }
    }
    Ok(ExitCode::SUCCESS)
}
