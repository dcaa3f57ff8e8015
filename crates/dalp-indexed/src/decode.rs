//! Decoding the token events we understand: ERC-20 `Transfer`/`Approval`, AccessControl
//! `RoleGranted`/`RoleRevoked`, Pausable `Paused`/`Unpaused`. A log whose first topic is one of
//! these signatures but whose shape is not (ERC-721's 4-topic `Transfer`, say) stays raw; a
//! log with the ERC-20 `Transfer` shape whose value is not one 32-byte word is malformed and
//! refused, since its value could not be a uint256.

use dalp_types::Invalid;
use num_bigint::BigUint;
use serde_json::{json, Value};

use crate::types::{hex0x, Address, Hash, Log};

/// keccak256("Transfer(address,address,uint256)")
pub const TRANSFER: Hash =
    hex32("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef");
/// keccak256("Approval(address,address,uint256)")
pub const APPROVAL: Hash =
    hex32("8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925");
/// keccak256("RoleGranted(bytes32,address,address)")
pub const ROLE_GRANTED: Hash =
    hex32("2f8788117e7eff1d82e926ec794901d17c78024a50270940304540a733656f0d");
/// keccak256("RoleRevoked(bytes32,address,address)")
pub const ROLE_REVOKED: Hash =
    hex32("f6391f5c32d9c69d2a47ea670b442974b53935d1edc7fd64eb21e047a839171b");
/// keccak256("Paused(address)")
pub const PAUSED: Hash = hex32("62e78cea01bee320cd4e420270b5ea74000d11b0c9f74754ebdbfc544b05a258");
/// keccak256("Unpaused(address)")
pub const UNPAUSED: Hash =
    hex32("5db9ee0a495bf2e6ff9c91a7834c1ba4fdd244a5e8aa4e537bd38aeae4b073aa");

const fn hex32(s: &str) -> Hash {
    Hash(hex32_bytes(s))
}

const fn hex32_bytes(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not lower-case hex"),
    }
}

/// An ERC-20 transfer (mint: `from` zero; burn: `to` zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub token: Address,
    pub from: Address,
    pub to: Address,
    pub value: BigUint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub contract: Address,
    pub role: Hash,
    pub account: Address,
    pub sender: Address,
    pub granted: bool,
}

/// What a log decodes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Transfer(Transfer),
    Approval {
        owner: Address,
        spender: Address,
        value: BigUint,
    },
    Role(RoleChange),
    Paused {
        account: Address,
        paused: bool,
    },
}

impl Decoded {
    /// The `event` column.
    pub fn name(&self) -> &'static str {
        match self {
            Decoded::Transfer(_) => "Transfer",
            Decoded::Approval { .. } => "Approval",
            Decoded::Role(r) if r.granted => "RoleGranted",
            Decoded::Role(_) => "RoleRevoked",
            Decoded::Paused { paused: true, .. } => "Paused",
            Decoded::Paused { .. } => "Unpaused",
        }
    }

    /// The `decoded` column: arguments by name, addresses and hashes as hex, values as
    /// decimal strings (exact).
    pub fn to_json(&self) -> Value {
        match self {
            Decoded::Transfer(t) => json!({
                "from": hex0x(&t.from), "to": hex0x(&t.to), "value": t.value.to_string()
            }),
            Decoded::Approval {
                owner,
                spender,
                value,
            } => json!({
                "owner": hex0x(owner), "spender": hex0x(spender), "value": value.to_string()
            }),
            Decoded::Role(r) => json!({
                "role": hex0x(&r.role), "account": hex0x(&r.account), "sender": hex0x(&r.sender)
            }),
            Decoded::Paused { account, .. } => json!({ "account": hex0x(account) }),
        }
    }
}

/// An address in a 32-byte word: 12 zero bytes, then the address.
fn word_address(word: &[u8]) -> Option<Address> {
    if word.len() != 32 || word[..12].iter().any(|&b| b != 0) {
        return None;
    }
    Address::try_from(&word[12..]).ok()
}

/// Decodes `log`; `Ok(None)` for events we do not understand. `at` names the log in errors.
pub fn decode(log: &Log, at: &str) -> Result<Option<Decoded>, Invalid> {
    let Some(topic0) = log.topics.first() else {
        return Ok(None);
    };
    let t = &log.topics;
    let decoded = match *topic0 {
        TRANSFER | APPROVAL if t.len() == 3 => {
            let (Some(a), Some(b)) = (word_address(&t[1]), word_address(&t[2])) else {
                return Ok(None);
            };
            if log.data.len() != 32 {
                return Err(Invalid::new(
                    "data",
                    format!(
                        "{at}: an ERC-20 {} value must be one 32-byte word (a uint256, at most 2^256-1); got {} bytes",
                        if *topic0 == TRANSFER { "Transfer" } else { "Approval" },
                        log.data.len()
                    ),
                ));
            }
            let value = BigUint::from_bytes_be(&log.data);
            if *topic0 == TRANSFER {
                Decoded::Transfer(Transfer {
                    token: log.address,
                    from: a,
                    to: b,
                    value,
                })
            } else {
                Decoded::Approval {
                    owner: a,
                    spender: b,
                    value,
                }
            }
        }
        ROLE_GRANTED | ROLE_REVOKED if t.len() == 4 && log.data.is_empty() => {
            let (Some(account), Some(sender)) = (word_address(&t[2]), word_address(&t[3])) else {
                return Ok(None);
            };
            Decoded::Role(RoleChange {
                contract: log.address,
                role: t[1],
                account,
                sender,
                granted: *topic0 == ROLE_GRANTED,
            })
        }
        PAUSED | UNPAUSED if t.len() == 1 => {
            let Some(account) = word_address(&log.data) else {
                return Ok(None);
            };
            Decoded::Paused {
                account,
                paused: *topic0 == PAUSED,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha3::{Digest, Keccak256};

    #[test]
    fn signatures_are_the_keccak_of_the_event_declarations() {
        for (sig, topic) in [
            ("Transfer(address,address,uint256)", TRANSFER),
            ("Approval(address,address,uint256)", APPROVAL),
            ("RoleGranted(bytes32,address,address)", ROLE_GRANTED),
            ("RoleRevoked(bytes32,address,address)", ROLE_REVOKED),
            ("Paused(address)", PAUSED),
            ("Unpaused(address)", UNPAUSED),
        ] {
            assert_eq!(
                Keccak256::digest(sig.as_bytes()).as_slice(),
                &topic[..],
                "{sig}"
            );
        }
    }

    fn word(addr: u8) -> Hash {
        let mut w = [0u8; 32];
        w[31] = addr;
        Hash(w)
    }

    fn log(topics: Vec<Hash>, data: Vec<u8>) -> Log {
        Log {
            tx_hash: Hash([1; 32]),
            tx_index: 0,
            log_index: 0,
            address: Address([9; 20]),
            topics,
            data,
        }
    }

    #[test]
    fn decodes_a_transfer_and_keeps_erc721_raw() {
        let mut value = vec![0u8; 32];
        value[31] = 7;
        let t = decode(&log(vec![TRANSFER, word(1), word(2)], value), "x")
            .unwrap()
            .unwrap();
        let Decoded::Transfer(t) = t else { panic!() };
        assert_eq!(t.value, BigUint::from(7u8));
        assert_eq!(t.to[19], 2);
        // ERC-721: token id indexed, no data.
        assert_eq!(
            decode(&log(vec![TRANSFER, word(1), word(2), word(3)], vec![]), "x").unwrap(),
            None
        );
    }

    #[test]
    fn refuses_a_transfer_value_wider_than_uint256() {
        let mut data = vec![0u8; 33];
        data[0] = 1; // 2^256
        let e = decode(
            &log(vec![TRANSFER, word(1), word(2)], data),
            "blocks[0].logs[0]",
        )
        .unwrap_err();
        assert_eq!(e.field, "data");
        assert!(e.message.contains("2^256-1"), "{e}");
    }

    #[test]
    fn decodes_roles_and_pause() {
        let r = decode(
            &log(vec![ROLE_GRANTED, Hash([5; 32]), word(1), word(2)], vec![]),
            "x",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.name(), "RoleGranted");
        let p = decode(&log(vec![UNPAUSED], word(4).to_vec()), "x")
            .unwrap()
            .unwrap();
        assert_eq!(p.name(), "Unpaused");
    }
}
