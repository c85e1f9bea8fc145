//! The MAC address of a virtio-net device, as a user writes it: `aa:bb:cc:dd:ee:ff`.

use std::fmt;
use std::str::FromStr;

/// The length of a MAC address in bytes.
pub const MAC_LEN: usize = 6;

/// Why a MAC address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The text is not six groups separated by colons.
    #[error(
        "The MAC address {input:?} is not six groups of two hex digits, as in aa:bb:cc:dd:ee:ff"
    )]
    Format {
        /// The text given.
        input: String,
    },
    /// A group is not two hex digits.
    #[error("The MAC address {input:?} has {group:?}, which is not two hex digits")]
    NotHex {
        /// The text given.
        input: String,
        /// The offending group.
        group: String,
    },
    /// The address is a multicast (or broadcast) address, which no NIC may have.
    #[error("The MAC address {mac} is a multicast address; a NIC needs a unicast one")]
    Multicast {
        /// The address.
        mac: MacAddr,
    },
    /// The address is all zeros, which no NIC may have.
    #[error("The MAC address 00:00:00:00:00:00 is not a valid NIC address")]
    Zero,
}

/// A unicast, non-zero Ethernet MAC address: one a NIC may have.
///
/// # Example
///
/// ```
/// use ember_virtio::net::MacAddr;
///
/// let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
/// assert_eq!(mac.bytes(), [0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
/// assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
/// assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; MAC_LEN]);

impl MacAddr {
    /// The address with these bytes, if a NIC may have it.
    ///
    /// # Errors
    ///
    /// [`Error::Multicast`] when the group bit (the low bit of the first byte) is set, and
    /// [`Error::Zero`] for the all-zero address.
    pub fn from_bytes(bytes: [u8; MAC_LEN]) -> Result<Self, Error> {
        let mac = MacAddr(bytes);
        if bytes[0] & 1 != 0 {
            return Err(Error::Multicast { mac });
        }
        if bytes == [0; MAC_LEN] {
            return Err(Error::Zero);
        }
        Ok(mac)
    }

    /// The address's bytes, in the order they go on the wire.
    pub fn bytes(&self) -> [u8; MAC_LEN] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let format = || Error::Format {
            input: input.to_owned(),
        };
        if input.split(':').count() != MAC_LEN {
            return Err(format());
        }
        let mut bytes = [0u8; MAC_LEN];
        for (byte, group) in bytes.iter_mut().zip(input.split(':')) {
            let hex = group.len() == 2 && group.bytes().all(|b| b.is_ascii_hexdigit());
            *byte = match u8::from_str_radix(group, 16) {
                Ok(value) if hex => value,
                _ => {
                    return Err(Error::NotHex {
                        input: input.to_owned(),
                        group: group.to_owned(),
                    });
                }
            };
        }
        MacAddr::from_bytes(bytes)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unicast_address_parses_in_either_case_and_prints_in_lower_case() {
        let mac: MacAddr = "AA:bb:0C:dd:ee:FF".parse().unwrap();
        assert_eq!(mac.bytes(), [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff]);
        assert_eq!(mac.to_string(), "aa:bb:0c:dd:ee:ff");
        assert_eq!(mac.to_string().parse::<MacAddr>().unwrap(), mac);
        assert_eq!(format!("{mac:?}"), "MacAddr(aa:bb:0c:dd:ee:ff)");
    }

    #[test]
    fn text_that_is_not_six_groups_is_a_format_error() {
        for input in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:ff:",
            "aabbccddeeff",
            "aa-bb-cc-dd-ee-ff",
        ] {
            let err = input.parse::<MacAddr>().unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "{input:?}: {err:?}");
        }
    }

    #[test]
    fn a_group_that_is_not_two_hex_digits_is_named_in_the_error() {
        for (input, bad) in [
            ("aa:bb:cc:dd:ee:fg", "fg"),
            ("aa:bb:c:dd:ee:ff", "c"),
            ("aa:bb:ccc:dd:ee:ff", "ccc"),
            ("aa:bb:+c:dd:ee:ff", "+c"),
            ("aa::cc:dd:ee:ff", ""),
            ("aa:bb:cc:dd:ee:é", "é"),
        ] {
            let err = input.parse::<MacAddr>().unwrap_err();
            assert_eq!(
                err,
                Error::NotHex {
                    input: input.into(),
                    group: bad.into()
                },
                "{input:?}"
            );
        }
    }

    #[test]
    fn multicast_broadcast_and_zero_addresses_are_refused() {
        for input in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            let err = input.parse::<MacAddr>().unwrap_err();
            assert!(matches!(err, Error::Multicast { .. }), "{input}: {err:?}");
            assert!(err.to_string().contains(input), "{err}");
        }
        assert_eq!(
            "00:00:00:00:00:00".parse::<MacAddr>().unwrap_err(),
            Error::Zero
        );
        // Locally administered unicast addresses are fine.
        MacAddr::from_bytes([0x02, 0, 0, 0, 0, 1]).unwrap();
    }
}
