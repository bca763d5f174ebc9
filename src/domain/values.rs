//! Newtypes for the order's values, built only through `parse`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a value given at the boundary was refused; the message is for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    pub field: &'static str,
    pub reason: &'static str,
}

/// Declares an id newtype over a UUID v7, so ids sort by creation time.
macro_rules! uuid_v7_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
pub(super) use uuid_v7_id;

uuid_v7_id!(
    /// An order's id.
    OrderId
);

/// The payment a refund goes back to: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentId(String);

impl PaymentId {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if raw.is_empty() || raw.len() > 64 || !raw.chars().all(valid_char) {
            return Err(ValueError {
                field: "payment_id",
                reason: "must be 1-64 characters of letters, digits, '-' or '_'",
            });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PaymentId {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<PaymentId> for String {
    fn from(id: PaymentId) -> Self {
        id.0
    }
}

/// A positive amount in minor units (cents); floats never hold money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct AmountCents(i64);

impl AmountCents {
    pub fn parse(cents: i64) -> Result<Self, ValueError> {
        if cents <= 0 {
            return Err(ValueError {
                field: "amount_cents",
                reason: "must be a positive number of cents",
            });
        }
        Ok(Self(cents))
    }

    pub fn cents(&self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for AmountCents {
    type Error = ValueError;
    fn try_from(cents: i64) -> Result<Self, Self::Error> {
        Self::parse(cents)
    }
}

impl From<AmountCents> for i64 {
    fn from(amount: AmountCents) -> Self {
        amount.0
    }
}

/// A customer's e-mail address; checked for shape only (one `@`, both sides non-empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerEmail(String);

impl CustomerEmail {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let error = ValueError {
            field: "customer_email",
            reason: "must look like name@domain (at most 254 characters)",
        };
        // Checked first and named apart: PostgreSQL refuses NUL in text, and
        // control characters in an address are never a typo worth guessing at.
        if raw.chars().any(char::is_control) {
            return Err(ValueError {
                field: "customer_email",
                reason: "must not contain control characters",
            });
        }
        let Some((local, domain)) = raw.split_once('@') else {
            return Err(error);
        };
        if local.is_empty()
            || domain.is_empty()
            || domain.contains('@')
            || raw.len() > 254
            || raw.chars().any(char::is_whitespace)
        {
            return Err(error);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerEmail {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<CustomerEmail> for String {
    fn from(email: CustomerEmail) -> Self {
        email.0
    }
}

/// Where an order ships to: 1–1000 characters, not all whitespace, without
/// control characters other than line breaks (addresses are written on
/// several lines). NUL in particular never reaches the database, which
/// refuses it in text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShippingAddress(String);

impl ShippingAddress {
    /// Long enough for any postal address, short enough that a client cannot
    /// store a document in it.
    pub const MAX_CHARS: usize = 1000;

    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let refuse = |reason| {
            Err(ValueError {
                field: "shipping_address",
                reason,
            })
        };
        if raw
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\r')
        {
            return refuse("must not contain control characters other than line breaks");
        }
        if raw.trim().is_empty() {
            return refuse("must not be blank (leave it out instead)");
        }
        if raw.chars().count() > Self::MAX_CHARS {
            return refuse("must be at most 1000 characters");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ShippingAddress {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<ShippingAddress> for String {
    fn from(address: ShippingAddress) -> Self {
        address.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_ids_with_odd_characters_are_refused() {
        assert!(PaymentId::parse("pay-123_A").is_ok());
        assert!(PaymentId::parse("").is_err());
        assert!(PaymentId::parse("pay 1").is_err());
        assert!(PaymentId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn amounts_must_be_positive() {
        assert!(AmountCents::parse(1).is_ok());
        assert!(AmountCents::parse(0).is_err());
        assert!(AmountCents::parse(-5).is_err());
    }

    #[test]
    fn emails_need_one_at_sign_between_two_parts() {
        assert!(CustomerEmail::parse("a@b.example").is_ok());
        assert!(CustomerEmail::parse("a.example").is_err());
        assert!(CustomerEmail::parse("@b").is_err());
        assert!(CustomerEmail::parse("a@b@c").is_err());
    }

    #[test]
    fn control_characters_are_refused_naming_the_field() {
        for raw in ["a\0@b.example", "a@b.example\u{7}", "a@b\u{1b}.example"] {
            let error = CustomerEmail::parse(raw).err();
            assert_eq!(error.map(|e| e.field), Some("customer_email"), "{raw:?}");
        }
        for raw in ["pay\0", "pay-\u{7f}"] {
            let error = PaymentId::parse(raw).err();
            assert_eq!(error.map(|e| e.field), Some("payment_id"), "{raw:?}");
        }
        for raw in ["1 Main St\0", "1 Main St\t", "\u{85}1 Main St"] {
            let error = ShippingAddress::parse(raw).err();
            assert_eq!(error.map(|e| e.field), Some("shipping_address"), "{raw:?}");
        }
    }

    #[test]
    fn shipping_addresses_may_span_lines_but_not_be_blank_or_huge() {
        assert!(ShippingAddress::parse("Ada Lovelace\r\n1 Main St\nLondon").is_ok());
        assert!(ShippingAddress::parse(" \n ").is_err());
        assert!(ShippingAddress::parse(&"é".repeat(ShippingAddress::MAX_CHARS)).is_ok());
        assert!(ShippingAddress::parse(&"é".repeat(ShippingAddress::MAX_CHARS + 1)).is_err());
    }
}
