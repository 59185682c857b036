//! The verbs calls: thin unsafe wrappers over `rdma-sys`. Device, port and GID lookup; PD, CQ,
//! QP and MR creation; the QP's state transitions; posting work requests and polling completion
//! queues; the registered mapping (receive ring, send staging area, credit slot and source).
//! Every object is owned by the struct that created it and released on drop. What to post and
//! when is the connection's business (`connection.rs`), how far it may go the credits'
//! (`credit.rs`).

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr;

use rdma_sys::*;

use super::credit::CREDIT_LEN;
use super::setup::{gid_text, Info};
use super::{RdmaError, RdmaSettings, RING_BYTES};

/// Receive work requests each side keeps posted (one per incoming RDMA WRITE WITH IMMEDIATE).
pub(super) const RECV_DEPTH: u32 = 256;
/// Send queue depth.
const SQ_DEPTH: u64 = 128;
/// Every this many send work requests, one is signalled (the others complete silently).
const SIGNAL_EVERY: u64 = 32;
/// Completions read per `ibv_poll_cq`.
pub(super) const CQ_BATCH: usize = 32;
/// Inline data asked for at QP creation (the device may grant less, or none).
const WANT_INLINE: [u32; 3] = [256, 64, 0];

/// The send work request that carries a credit (a plain RDMA WRITE into the peer's credit slot).
pub(super) const CREDIT_WR: usize = 0;
/// The send work requests that carry data (the second after a wrap).
pub(super) const DATA_WRS: [usize; 2] = [1, 2];

/// A verb that failed and set errno.
pub(super) fn verbs_err(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::last_os_error(),
    }
}

/// A verb that failed and returned its errno (possibly negated).
fn verbs_rc(op: &'static str, rc: i32) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::from_raw_os_error(rc.abs()),
    }
}

/// The verbs objects of one connection, released in reverse order on drop. Every pointer is
/// either null (not created) or owned by this struct.
pub(super) struct Verbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mr: *mut ibv_mr,
    /// Anonymous mapping: receive ring | send staging | credit slot | credit source.
    mem: *mut u8,
    mem_len: usize,
    device: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    mtu: ibv_mtu::Type,
    max_inline: u32,
}

// SAFETY: the verbs objects are thread-safe per libibverbs; the mapping is owned by this struct.
// A `Verbs` is used by one thread at a time (the connection that owns it is moved between
// threads as a whole, behind `&mut` or the poller's mutex).
unsafe impl Send for Verbs {}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or a live object created by the matching verb and owned by
        // us; destruction follows the dependency order (QP before its CQs, MR and CQs before the
        // PD and channel, everything before the context), and each is destroyed once. Completion
        // events are acknowledged as they are read, so destroying the CQ cannot block.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.mr.is_null() {
                ibv_dereg_mr(self.mr);
            }
            if !self.send_cq.is_null() {
                ibv_destroy_cq(self.send_cq);
            }
            if !self.recv_cq.is_null() {
                ibv_destroy_cq(self.recv_cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ibv_close_device(self.ctx);
            }
            if !self.mem.is_null() {
                libc::munmap(self.mem.cast(), self.mem_len);
            }
        }
    }
}

/// Opens the configured device and checks its port and GID. Returns the context and what was
/// found; the caller owns the context (stored in a `Verbs` at once).
fn open_device(s: &RdmaSettings, v: &mut Verbs) -> Result<ibv_port_attr, RdmaError> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a live i32 the call writes the device count into.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENOENT) => RdmaError::NoDevice,
            _ => RdmaError::Verbs {
                op: "ibv_get_device_list",
                source: e,
            },
        });
    }
    let mut names = Vec::new();
    let mut chosen = None;
    for i in 0..n.max(0) as usize {
        // SAFETY: `list` holds `n` valid device pointers (then a null).
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a valid device; the name is a NUL-terminated string it owns.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        let wanted = s.device.as_deref().is_none_or(|w| w == name);
        if wanted && chosen.is_none() {
            chosen = Some((dev, name.clone()));
        }
        names.push(name);
    }
    let result = match chosen {
        None if names.is_empty() => Err(RdmaError::NoDevice),
        None => Err(RdmaError::UnknownDevice {
            name: s.device.clone().unwrap_or_default(),
            found: names.join(", "),
        }),
        Some((dev, name)) => {
            // SAFETY: `dev` comes from the live list (freed only below).
            let ctx = unsafe { ibv_open_device(dev) };
            if ctx.is_null() {
                Err(verbs_err("ibv_open_device"))
            } else {
                v.ctx = ctx;
                v.device = name;
                Ok(())
            }
        }
    };
    // SAFETY: the list came from ibv_get_device_list and is freed once; the opened context does
    // not depend on it.
    unsafe { ibv_free_device_list(list) };
    result?;
    // SAFETY: ibv_port_attr is plain data; all-zero is a valid value to be overwritten.
    let mut attr: ibv_port_attr = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: `v.ctx` is open; `attr` is a live struct of the size the call is told.
    let rc = unsafe { ___ibv_query_port(v.ctx, s.port, &mut attr) };
    if rc != 0 {
        return Err(RdmaError::Port {
            device: v.device.clone(),
            port: s.port,
            why: format!(
                "cannot query it ({}); does the device have that port?",
                io::Error::from_raw_os_error(rc.abs())
            ),
        });
    }
    if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
        let state = match attr.state {
            ibv_port_state::IBV_PORT_DOWN => "DOWN",
            ibv_port_state::IBV_PORT_INIT => "INIT",
            ibv_port_state::IBV_PORT_ARMED => "ARMED",
            _ => "not active",
        };
        return Err(RdmaError::Port {
            device: v.device.clone(),
            port: s.port,
            why: format!("port is {state}, not ACTIVE (is its network link up?)"),
        });
    }
    v.port = s.port;
    let query = |i: u8| -> Option<[u8; 16]> {
        // SAFETY: ibv_gid is plain bytes; all-zero is valid.
        let mut gid: ibv_gid = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: `v.ctx` is open; `gid` is a live ibv_gid.
        let rc = unsafe { ibv_query_gid(v.ctx, s.port, i32::from(i), &mut gid) };
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        let raw = unsafe { gid.raw };
        (rc == 0 && raw != [0; 16]).then_some(raw)
    };
    let (index, gid) = match s.gid_index {
        Some(i) => match query(i) {
            Some(g) => (i, g),
            None => {
                return Err(RdmaError::Gid {
                    device: v.device.clone(),
                    port: s.port,
                    why: format!(
                        "GID index {i} is empty or does not exist (the port has {} entries; `ibv_devinfo -v` lists them)",
                        attr.gid_tbl_len
                    ),
                })
            }
        },
        None => {
            let len = attr.gid_tbl_len.clamp(0, 256) as u16;
            let gids: Vec<(u8, [u8; 16])> = (0..len)
                .filter_map(|i| query(i as u8).map(|g| (i as u8, g)))
                .collect();
            let v4 = |g: &[u8; 16]| g[..10] == [0; 10] && g[10..12] == [0xff, 0xff];
            match gids.iter().find(|(_, g)| v4(g)).or(gids.first()) {
                Some(&(i, g)) => (i, g),
                None => {
                    return Err(RdmaError::Gid {
                        device: v.device.clone(),
                        port: s.port,
                        why: "the port has no GID (no IP address on its network device?)".into(),
                    })
                }
            }
        }
    };
    v.gid_index = index;
    v.gid = gid;
    v.mtu = attr.active_mtu;
    Ok(attr)
}

/// Checks that the configured device, port and GID are usable (for a clear error at open time).
pub fn probe(s: &RdmaSettings) -> Result<String, RdmaError> {
    let mut v = Verbs::empty();
    open_device(s, &mut v)?;
    Ok(format!(
        "{} port {} GID[{}] {}",
        v.device,
        v.port,
        v.gid_index,
        gid_text(&v.gid)
    ))
}

impl Verbs {
    fn empty() -> Verbs {
        Verbs {
            ctx: ptr::null_mut(),
            pd: ptr::null_mut(),
            channel: ptr::null_mut(),
            send_cq: ptr::null_mut(),
            recv_cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            mr: ptr::null_mut(),
            mem: ptr::null_mut(),
            mem_len: 0,
            device: String::new(),
            port: 0,
            gid_index: 0,
            gid: [0; 16],
            mtu: ibv_mtu::IBV_MTU_1024,
            max_inline: 0,
        }
    }

    /// Opens the device and creates everything up to a QP in INIT with registered memory.
    pub(super) fn prepare(s: &RdmaSettings) -> Result<Verbs, RdmaError> {
        let mut v = Verbs::empty();
        open_device(s, &mut v)?;
        // SAFETY: every call gets live objects created just above (non-null is checked after
        // each creation) and plain-data attribute structs that outlive the call.
        unsafe {
            v.pd = ibv_alloc_pd(v.ctx);
            if v.pd.is_null() {
                return Err(verbs_err("ibv_alloc_pd"));
            }
            v.channel = ibv_create_comp_channel(v.ctx);
            if v.channel.is_null() {
                return Err(verbs_err("ibv_create_comp_channel"));
            }
            let fd = (*v.channel).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(verbs_err("making the completion channel non-blocking"));
            }
            v.send_cq = ibv_create_cq(v.ctx, SQ_DEPTH as i32, ptr::null_mut(), ptr::null_mut(), 0);
            if v.send_cq.is_null() {
                return Err(verbs_err("ibv_create_cq (send)"));
            }
            v.recv_cq = ibv_create_cq(v.ctx, RECV_DEPTH as i32, ptr::null_mut(), v.channel, 0);
            if v.recv_cq.is_null() {
                return Err(verbs_err("ibv_create_cq (receive)"));
            }
            for want in WANT_INLINE {
                let mut init: ibv_qp_init_attr = MaybeUninit::zeroed().assume_init();
                init.send_cq = v.send_cq;
                init.recv_cq = v.recv_cq;
                init.qp_type = ibv_qp_type::IBV_QPT_RC;
                init.sq_sig_all = 0;
                init.cap.max_send_wr = SQ_DEPTH as u32;
                init.cap.max_recv_wr = RECV_DEPTH;
                init.cap.max_send_sge = 1;
                init.cap.max_recv_sge = 1;
                init.cap.max_inline_data = want;
                v.qp = ibv_create_qp(v.pd, &mut init);
                if !v.qp.is_null() {
                    // The device may grant more inline data than asked; use what it reports.
                    v.max_inline = init.cap.max_inline_data;
                    break;
                }
            }
            if v.qp.is_null() {
                return Err(verbs_err("ibv_create_qp"));
            }
            // Anonymous private memory, populated now: registered (pinned) once per connection.
            // Not a file-backed MAP_SHARED mapping, which the kernel refuses to pin long-term.
            v.mem_len = 2 * RING_BYTES as usize + 4096;
            let m = libc::mmap(
                ptr::null_mut(),
                v.mem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            );
            if m == libc::MAP_FAILED {
                return Err(verbs_err("mmap of the RDMA buffers"));
            }
            v.mem = m.cast();
            let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            v.mr = ibv_reg_mr(v.pd, v.mem.cast(), v.mem_len, access as i32);
            if v.mr.is_null() {
                return Err(verbs_err("ibv_reg_mr"));
            }
            let mut attr: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = v.port;
            attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            let rc = ibv_modify_qp(v.qp, &mut attr, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (INIT)", rc));
            }
        }
        Ok(v)
    }

    /// Our receive ring ([`RING_BYTES`]), where the peer writes.
    pub(super) fn ring(&self) -> *mut u8 {
        self.mem
    }

    /// The send staging area ([`RING_BYTES`]), mirroring the peer's ring offsets.
    pub(super) fn staging(&self) -> *mut u8 {
        // SAFETY: the mapping is 2 * RING_BYTES + 4096 bytes long.
        unsafe { self.mem.add(RING_BYTES as usize) }
    }

    fn credit_slot(&self) -> *mut u8 {
        // SAFETY: as above; the slot is 8-byte aligned (page-aligned mapping + 2 * RING_BYTES).
        unsafe { self.mem.add(2 * RING_BYTES as usize) }
    }

    fn credit_source(&self) -> *mut u8 {
        // SAFETY: as above (64 bytes after the slot, inside the last page).
        unsafe { self.mem.add(2 * RING_BYTES as usize + 64) }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is live once `prepare` returned.
        unsafe { (*self.mr).lkey }
    }

    /// The device's name.
    pub(super) fn device(&self) -> &str {
        &self.device
    }

    /// The maximum inline payload the QP accepts (0: none).
    pub(super) fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// Our QP number.
    pub(super) fn qp_num(&self) -> u32 {
        // SAFETY: `qp` is live once `prepare` returned.
        unsafe { (*self.qp).qp_num }
    }

    /// The receive CQ's completion channel (non-blocking).
    pub(super) fn channel_fd(&self) -> RawFd {
        // SAFETY: `channel` is live for the life of `self` once `prepare` returned.
        unsafe { (*self.channel).fd }
    }

    /// Our setup record, with `psn` as our starting packet sequence number.
    pub(super) fn info(&self, psn: u32) -> Info {
        Info {
            mtu: self.mtu as u16,
            // SAFETY: `qp` and `mr` are live once `prepare` returned.
            qpn: unsafe { (*self.qp).qp_num },
            psn,
            gid: self.gid,
            ring_addr: self.ring() as u64,
            ring_len: RING_BYTES,
            credit_addr: self.credit_slot() as u64,
            // SAFETY: as above.
            rkey: unsafe { (*self.mr).rkey },
            recv_depth: RECV_DEPTH,
        }
    }

    /// INIT → RTR → RTS towards `peer`.
    pub(super) fn connect_qp(&self, peer: &Info, psn: u32) -> Result<(), RdmaError> {
        // SAFETY: `qp` is live; the attribute struct is plain data that outlives each call.
        unsafe {
            let mut a: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            a.qp_state = ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = self.mtu.min(u32::from(peer.mtu));
            a.dest_qp_num = peer.qpn;
            a.rq_psn = peer.psn;
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12;
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = peer.gid;
            a.ah_attr.grh.sgid_index = self.gid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.dlid = 0;
            a.ah_attr.sl = 0;
            a.ah_attr.src_path_bits = 0;
            a.ah_attr.port_num = self.port;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            let rc = ibv_modify_qp(self.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (RTR)", rc));
            }
            let mut a: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            a.qp_state = ibv_qp_state::IBV_QPS_RTS;
            // 4.096 us * 2^14 = 67 ms per retry, 7 retries: a silent peer fails the QP in ~0.5 s
            // (the liveness socket usually reports a dead process sooner).
            a.timeout = 14;
            a.retry_cnt = 7;
            // Receives are always posted ahead of the credits we grant; 7 = retry forever.
            a.rnr_retry = 7;
            a.sq_psn = psn;
            a.max_rd_atomic = 1;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            let rc = ibv_modify_qp(self.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (RTS)", rc));
            }
        }
        Ok(())
    }

    /// Polls the send CQ into `wcs`; returns how many completions it wrote.
    fn poll_send_cq(&self, wcs: &mut [ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: `send_cq` is live; `wcs` holds `wcs.len()` writable entries.
        let n = unsafe { ibv_poll_cq(self.send_cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs_rc("ibv_poll_cq (send)", n));
        }
        Ok(n as usize)
    }

    /// Polls the receive CQ into `wcs`; returns how many completions it wrote.
    pub(super) fn poll_recv_cq(&self, wcs: &mut [ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: `recv_cq` is live; `wcs` holds `wcs.len()` writable entries.
        let n = unsafe { ibv_poll_cq(self.recv_cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs_rc("ibv_poll_cq (receive)", n));
        }
        Ok(n as usize)
    }

    /// Asks for an event on the completion channel at the receive CQ's next completion; returns
    /// whether it is armed.
    pub(super) fn arm_recv_cq(&self) -> bool {
        // SAFETY: `recv_cq` is live and was created with our completion channel.
        let rc = unsafe { ibv_req_notify_cq(self.recv_cq, 0) };
        rc == 0
    }

    /// Reads pending completion-channel events (non-blocking); returns whether there was one.
    pub(super) fn drain_events(&self) -> bool {
        let mut got = false;
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; the out-pointers are live.
            let rc = unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                return got;
            }
            // SAFETY: `cq` is the CQ the event was for (ours); one event read, one acknowledged.
            unsafe { ibv_ack_cq_events(cq, 1) };
            got = true;
        }
    }

    /// The three words of our credit slot as they are now (the peer's NIC may be writing them).
    pub(super) fn read_credit_slot(&self) -> [u64; 3] {
        let slot = self.credit_slot() as *const u64;
        // SAFETY: the slot is 24 aligned bytes of our live mapping that the peer's NIC may write
        // at any time: volatile reads, and a torn record fails the check word (credit.rs).
        unsafe {
            [
                ptr::read_volatile(slot),
                ptr::read_volatile(slot.add(1)),
                ptr::read_volatile(slot.add(2)),
            ]
        }
    }

    /// Writes a credit record into the credit source (read by the next credit WR).
    pub(super) fn write_credit_source(&self, words: [u64; 3]) {
        let src = self.credit_source() as *mut u64;
        // SAFETY: 24 aligned bytes of our mapping. When the credit WR is not inline, an earlier
        // credit WR may still be reading it: the peer then sees a torn record, which its check
        // word rejects, and the WR posted after this write carries the whole record.
        unsafe {
            ptr::write_volatile(src, words[0]);
            ptr::write_volatile(src.add(1), words[1]);
            ptr::write_volatile(src.add(2), words[2]);
        }
    }
}

/// One receive completion, copied out of an `ibv_wc`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival {
    pub(super) status: ibv_wc_status::Type,
    pub(super) opcode: ibv_wc_opcode::Type,
    pub(super) byte_len: u32,
    pub(super) imm: u32,
    pub(super) vendor_err: u32,
}

impl Arrival {
    pub(super) fn of(wc: &ibv_wc) -> Arrival {
        Arrival {
            status: wc.status,
            opcode: wc.opcode,
            byte_len: wc.byte_len,
            // SAFETY: both union members are u32; for a write with immediate it is the immediate.
            imm: u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }),
            vendor_err: wc.vendor_err,
        }
    }

    /// Whether the work request succeeded.
    pub(super) fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }

    /// Whether it is an RDMA WRITE WITH IMMEDIATE (the only thing a peer may send us).
    pub(super) fn is_write_with_imm(&self) -> bool {
        self.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM
    }
}

/// A completion status as libibverbs spells it.
pub(super) fn status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

/// An empty completion entry to poll into.
pub(super) fn zeroed_wc() -> ibv_wc {
    // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is valid.
    unsafe { MaybeUninit::<ibv_wc>::zeroed().assume_init() }
}

/// `n` empty completion entries to poll into.
pub(super) fn zeroed_wcs(n: usize) -> Box<[ibv_wc]> {
    (0..n).map(|_| zeroed_wc()).collect()
}

/// The send side of the QP: the three send work requests, built once and patched per flush
/// ([`CREDIT_WR`], then [`DATA_WRS`]), and the count of those posted and retired.
pub(super) struct SendQueue {
    wrs: Box<[ibv_send_wr; 3]>,
    sges: Box<[ibv_sge; 3]>,
    posted: u64,
    done: u64,
}

// SAFETY: the raw pointers in the work requests point into the boxes this struct owns (their
// SGEs, each other), which do not move when the struct does, and are used by one thread at a
// time (every method takes `&mut self`); the addresses in the SGEs are plain integers.
unsafe impl Send for SendQueue {}

impl SendQueue {
    fn new() -> SendQueue {
        // SAFETY: work requests and SGEs are plain data (integers, pointers, unions of those);
        // all-zero (null pointers) is valid.
        let zero_wr = || unsafe { MaybeUninit::<ibv_send_wr>::zeroed().assume_init() };
        // SAFETY: as above.
        let zero_sge = || unsafe { MaybeUninit::<ibv_sge>::zeroed().assume_init() };
        SendQueue {
            wrs: Box::new([zero_wr(), zero_wr(), zero_wr()]),
            sges: Box::new([zero_sge(), zero_sge(), zero_sge()]),
            posted: 0,
            done: 0,
        }
    }

    /// Fills the fixed fields of the three send work requests once: the peer's rkey, and the
    /// credit WR's source (our credit source) and target (the peer's credit slot).
    pub(super) fn build(&mut self, v: &Verbs, peer_rkey: u32, peer_credit: u64) {
        let lkey = v.lkey();
        for i in 0..3 {
            let sge: *mut ibv_sge = &mut self.sges[i];
            let wr = &mut self.wrs[i];
            wr.sg_list = sge;
            wr.num_sge = 1;
            wr.next = ptr::null_mut();
            wr.wr.rdma.rkey = peer_rkey;
            self.sges[i].lkey = lkey;
        }
        // Credit write: a plain RDMA WRITE of the credit source into the peer's credit slot.
        self.wrs[CREDIT_WR].opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        self.wrs[CREDIT_WR].wr.rdma.remote_addr = peer_credit;
        self.sges[CREDIT_WR].addr = v.credit_source() as u64;
        self.sges[CREDIT_WR].length = CREDIT_LEN as u32;
        for i in DATA_WRS {
            self.wrs[i].opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        }
    }

    /// Sends the credit WR's record inline (copied at post time) or from the registered source.
    pub(super) fn set_credit_inline(&mut self, inline: bool) {
        self.wrs[CREDIT_WR].send_flags = if inline {
            ibv_send_flags::IBV_SEND_INLINE.0
        } else {
            0
        };
    }

    /// Patches data WR `slot`: `len` bytes from `addr` (registered memory, or any readable
    /// memory when `inline`) to `remote_addr` in the peer's ring, the immediate announcing `len`.
    pub(super) fn set_data(
        &mut self,
        slot: usize,
        addr: u64,
        len: u32,
        inline: bool,
        remote_addr: u64,
    ) {
        debug_assert!(DATA_WRS.contains(&slot));
        self.sges[slot].addr = addr;
        self.sges[slot].length = len;
        let wr = &mut self.wrs[slot];
        wr.send_flags = if inline {
            ibv_send_flags::IBV_SEND_INLINE.0
        } else {
            0
        };
        wr.imm_data_invalidated_rkey_union.imm_data = len.to_be();
        wr.wr.rdma.remote_addr = remote_addr;
    }

    /// Free entries of the send queue (as far as the signalled completions tell).
    pub(super) fn room(&self) -> u64 {
        SQ_DEPTH - (self.posted - self.done)
    }

    /// Posts the prepared work requests `slots` as one chain (one doorbell); every
    /// `SIGNAL_EVERY`-th is signalled.
    ///
    /// # Safety
    ///
    /// Each data WR in `slots` was last patched by [`set_data`](Self::set_data) with an address
    /// of `len` bytes that are registered with `v`'s memory region (and stay untouched until the
    /// peer's credit covers them) or, when inline, readable for the duration of this call.
    pub(super) unsafe fn post(&mut self, v: &Verbs, slots: &[usize]) -> Result<(), RdmaError> {
        debug_assert!(!slots.is_empty() && slots.len() <= 3);
        debug_assert!(self.posted - self.done + slots.len() as u64 <= SQ_DEPTH);
        for (j, &slot) in slots.iter().enumerate() {
            let k = self.posted + j as u64 + 1;
            let next: *mut ibv_send_wr = match slots.get(j + 1) {
                Some(&n) => &mut self.wrs[n],
                None => ptr::null_mut(),
            };
            let wr = &mut self.wrs[slot];
            wr.wr_id = k;
            wr.next = next;
            if k.is_multiple_of(SIGNAL_EVERY) {
                wr.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            } else {
                wr.send_flags &= !ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain links live work requests in `wrs`, each with one SGE in `sges` that
        // points at registered memory (lkey) or, when inline, at bytes that stay valid for the
        // call (the caller's contract; the credit WR's source is in `v`'s mapping); the QP is
        // live.
        let rc = unsafe { ibv_post_send(v.qp, &mut self.wrs[slots[0]], &mut bad) };
        if rc != 0 {
            return Err(verbs_rc("ibv_post_send", rc));
        }
        self.posted += slots.len() as u64;
        Ok(())
    }

    /// Reaps send completions (into `wcs`): any error fails the connection; a success retires
    /// every work request up to the signalled one.
    pub(super) fn reap(&mut self, v: &Verbs, wcs: &mut [ibv_wc]) -> Result<(), RdmaError> {
        loop {
            let n = v.poll_send_cq(wcs)?;
            for wc in &wcs[..n] {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(RdmaError::Completion {
                        queue: "send",
                        status: status_text(wc.status),
                        vendor_err: wc.vendor_err,
                    });
                }
                self.done = self.done.max(wc.wr_id);
            }
            if n < wcs.len() {
                return Ok(());
            }
        }
    }
}

/// The receive side of the QP: [`RECV_DEPTH`] buffer-less receive work requests, pre-chained.
pub(super) struct RecvQueue {
    wrs: Box<[ibv_recv_wr]>,
}

// SAFETY: as for `SendQueue`: the `next` pointers point into the box this struct owns, which
// does not move when the struct does; every method takes `&mut self`.
unsafe impl Send for RecvQueue {}

impl RecvQueue {
    fn new() -> RecvQueue {
        let mut wrs: Box<[ibv_recv_wr]> = (0..RECV_DEPTH as usize)
            .map(|i| ibv_recv_wr {
                wr_id: i as u64,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            })
            .collect();
        for i in 0..wrs.len() - 1 {
            let next: *mut ibv_recv_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        RecvQueue { wrs }
    }

    /// Posts `n` receives (a prefix of the pre-chained list, cut after `n`).
    pub(super) fn post(&mut self, v: &Verbs, n: usize) -> Result<(), RdmaError> {
        debug_assert!(n >= 1 && n <= self.wrs.len());
        let saved = self.wrs[n - 1].next;
        self.wrs[n - 1].next = ptr::null_mut();
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the first `n` entries of `wrs` form a null-terminated chain of live,
        // buffer-less receive work requests; the QP is live.
        let rc = unsafe { ibv_post_recv(v.qp, self.wrs.as_mut_ptr(), &mut bad) };
        self.wrs[n - 1].next = saved;
        if rc != 0 {
            return Err(verbs_rc("ibv_post_recv", rc));
        }
        Ok(())
    }
}

/// The parts of a connection prepared before the peer's record is known.
pub(super) struct Parts {
    pub(super) v: Verbs,
    pub(super) sq: SendQueue,
    pub(super) rq: RecvQueue,
}

impl Parts {
    /// Pre-chains the receive work requests and posts all of them (before the peer can write).
    pub(super) fn new(v: Verbs) -> Result<Parts, RdmaError> {
        let mut rq = RecvQueue::new();
        rq.post(&v, RECV_DEPTH as usize)?;
        Ok(Parts {
            v,
            sq: SendQueue::new(),
            rq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_device_name_is_a_clear_error() {
        let s = RdmaSettings {
            device: Some("no-such-rdma-device".into()),
            port: 1,
            gid_index: None,
        };
        let e = probe(&s).unwrap_err().to_string();
        assert!(
            e.contains("no RDMA device"),
            "unexpected error for a missing device: {e}"
        );
    }
}
