//! The setup record: what each side tells the other over TCP before its queue pair can take
//! writes (64 bytes, little-endian, versioned, and checked on arrival: a bad one is refused).
//! Pure code: no verbs.

use super::RdmaError;

/// Magic of the setup record.
const INFO_MAGIC: u32 = u32::from_le_bytes(*b"LMRD");
/// Version of the setup record and of the ring/credit scheme.
const INFO_VERSION: u16 = 1;
/// Bytes of the setup record.
pub(super) const INFO_LEN: usize = 64;

/// The setup record each side sends over TCP (little-endian, [`INFO_LEN`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Info {
    pub(super) mtu: u16,
    pub(super) qpn: u32,
    pub(super) psn: u32,
    pub(super) gid: [u8; 16],
    pub(super) ring_addr: u64,
    pub(super) ring_len: u64,
    pub(super) credit_addr: u64,
    pub(super) rkey: u32,
    pub(super) recv_depth: u32,
}

impl Info {
    pub(super) fn encode(&self) -> [u8; INFO_LEN] {
        let mut b = [0u8; INFO_LEN];
        b[0..4].copy_from_slice(&INFO_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&INFO_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.mtu.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..40].copy_from_slice(&self.ring_addr.to_le_bytes());
        b[40..48].copy_from_slice(&self.ring_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.credit_addr.to_le_bytes());
        b[56..60].copy_from_slice(&self.rkey.to_le_bytes());
        b[60..64].copy_from_slice(&self.recv_depth.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; INFO_LEN]) -> Result<Info, RdmaError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let magic = u32_at(0);
        if magic != INFO_MAGIC {
            return Err(RdmaError::PeerSetup(format!(
                "bad magic {magic:#x} (not a libmirror RDMA peer, or the peer uses transport = tcp)"
            )));
        }
        let version = u16_at(4);
        if version != INFO_VERSION {
            return Err(RdmaError::PeerSetup(format!(
                "version {version}, this node speaks {INFO_VERSION}"
            )));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let info = Info {
            mtu: u16_at(6),
            qpn: u32_at(8),
            psn: u32_at(12),
            gid,
            ring_addr: u64_at(32),
            ring_len: u64_at(40),
            credit_addr: u64_at(48),
            rkey: u32_at(56),
            recv_depth: u32_at(60),
        };
        if !(1..=5).contains(&info.mtu) {
            return Err(RdmaError::PeerSetup(format!("MTU code {}", info.mtu)));
        }
        // Our staging area mirrors the peer's ring offsets and is RING_BYTES long: a larger
        // ring would make a send copy past its end.
        if !(4096..=super::RING_BYTES).contains(&info.ring_len) {
            return Err(RdmaError::PeerSetup(format!(
                "ring of {} bytes (4096 ..= {} accepted)",
                info.ring_len,
                super::RING_BYTES
            )));
        }
        if !(1..=1 << 16).contains(&info.recv_depth) {
            return Err(RdmaError::PeerSetup(format!(
                "receive depth {}",
                info.recv_depth
            )));
        }
        if info.gid == [0; 16] || info.qpn == 0 || info.psn > 0xff_ffff {
            return Err(RdmaError::PeerSetup(
                "empty GID, QP number 0 or PSN over 24 bits".into(),
            ));
        }
        Ok(info)
    }
}

/// A GID as text (IPv4-mapped GIDs as `::ffff:a.b.c.d`).
pub(super) fn gid_text(gid: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*gid).to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::verbs::RECV_DEPTH;
    use super::super::RING_BYTES;
    use super::*;

    #[test]
    fn setup_record_roundtrips_and_rejects_garbage() {
        let info = Info {
            mtu: 3,
            qpn: 0x11,
            psn: 0x12_3456,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1],
            ring_addr: 0x7f00_0000_0000,
            ring_len: RING_BYTES,
            credit_addr: 0x7f00_0080_0000,
            rkey: 0x1234,
            recv_depth: RECV_DEPTH,
        };
        assert_eq!(Info::decode(&info.encode()).unwrap(), info);
        // The wire bytes, pinned: a change here is a change of the setup record (bump the version).
        #[rustfmt::skip]
        let wire: [u8; INFO_LEN] = [
            b'L', b'M', b'R', b'D', 1, 0, 3, 0, // magic, version, MTU code
            0x11, 0, 0, 0, 0x56, 0x34, 0x12, 0, // QP number, PSN
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1, // GID
            0, 0, 0, 0, 0, 0x7f, 0, 0, // ring address
            0, 0, 0x40, 0, 0, 0, 0, 0, // ring length
            0, 0, 0x80, 0, 0, 0x7f, 0, 0, // credit slot address
            0x34, 0x12, 0, 0, 0, 1, 0, 0, // rkey, receive depth
        ];
        assert_eq!(info.encode(), wire);
        let mut bad = info.encode();
        bad[0] ^= 1;
        assert!(matches!(Info::decode(&bad), Err(RdmaError::PeerSetup(_))));
        let mut bad = info.encode();
        bad[4] = 9;
        assert!(Info::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let zero_gid = Info {
            gid: [0; 16],
            ..info
        };
        assert!(Info::decode(&zero_gid.encode()).is_err());
        let huge = Info {
            ring_len: 1 << 40,
            ..info
        };
        assert!(Info::decode(&huge.encode()).is_err());
        let over_staging = Info {
            ring_len: crate::transport::rdma::RING_BYTES + 4096,
            ..info
        };
        assert!(
            Info::decode(&over_staging.encode()).is_err(),
            "a ring larger than our staging area would overrun it"
        );
        assert_eq!(gid_text(&info.gid), "::ffff:10.77.0.1");
    }

    proptest! {
        /// Every acceptable record survives the trip; any 64 bytes decode or are refused, never
        /// panic, and what decodes re-encodes to the same bytes.
        #[test]
        fn setup_record_roundtrips(
            mtu in 1u16..=5,
            qpn in 1u32..,
            psn in 0u32..=0xff_ffff,
            gid in any::<[u8; 16]>().prop_filter("non-zero GID", |g| *g != [0; 16]),
            ring_addr in any::<u64>(),
            ring_len in 4096u64..=crate::transport::rdma::RING_BYTES,
            credit_addr in any::<u64>(),
            rkey in any::<u32>(),
            recv_depth in 1u32..=1 << 16,
            noise in proptest::collection::vec(any::<u8>(), INFO_LEN),
        ) {
            let info = Info { mtu, qpn, psn, gid, ring_addr, ring_len, credit_addr, rkey, recv_depth };
            prop_assert_eq!(Info::decode(&info.encode()).unwrap(), info);
            let noise: [u8; INFO_LEN] = noise.try_into().unwrap();
            if let Ok(decoded) = Info::decode(&noise) {
                prop_assert_eq!(decoded.encode(), noise);
            }
        }
    }
}
