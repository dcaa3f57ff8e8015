//! Whole numbers of any size as PostgreSQL `numeric`, in the binary format binary COPY and
//! bind parameters use (tokio-postgres has no big-integer `numeric` of its own).

use bytes::{BufMut, BytesMut};
use num_bigint::{BigInt, Sign};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// A whole number bound as `numeric`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numeric(pub BigInt);

const NUMERIC_NEG: u16 = 0x4000;

/// Base-10000 digits of `n`, most significant first, with trailing zero groups removed, and
/// the weight (power of 10000 of the first group).
fn base10000(n: &BigInt) -> (Vec<i16>, i16) {
    let decimal = n.magnitude().to_str_radix(10);
    if decimal == "0" {
        return (Vec::new(), 0);
    }
    let pad = (4 - decimal.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(b'0', pad)
        .chain(decimal.bytes())
        .collect();
    let mut groups: Vec<i16> = padded
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let weight = groups.len() as i16 - 1;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    (groups, weight)
}

impl ToSql for Numeric {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let (digits, weight) = base10000(&self.0);
        out.put_i16(i16::try_from(digits.len())?);
        out.put_i16(weight);
        out.put_u16(if self.0.sign() == Sign::Minus {
            NUMERIC_NEG
        } else {
            0
        });
        out.put_u16(0); // display scale: whole numbers
        for d in digits {
            out.put_i16(d);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits_in_base_10000() {
        assert_eq!(base10000(&BigInt::from(0)), (vec![], 0));
        assert_eq!(base10000(&BigInt::from(7)), (vec![7], 0));
        assert_eq!(base10000(&BigInt::from(12345)), (vec![1, 2345], 1));
        assert_eq!(base10000(&BigInt::from(100000000)), (vec![1], 2));
        assert_eq!(base10000(&BigInt::from(-10001)), (vec![1, 1], 1));
    }
}
