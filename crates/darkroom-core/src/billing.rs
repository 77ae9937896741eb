//! Metering and prices. An app declares what it bills by (its [`BillingUnit`]) and how many units an input will
//! cost ([`UnitEstimate`]); the operator sets the prices ([`PriceBook`]). Each request's prices are fixed when it
//! is accepted and its cost is computed, from the units the app reported and the runner time it held, in the same
//! store transaction that completes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What one billed unit is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingUnit {
    /// One successful request.
    #[default]
    Request,
    /// One output image.
    Image,
    /// A million output pixels.
    Megapixel,
    /// A second of audio (input audio for speech-to-text, output audio for speech synthesis).
    AudioSecond,
    /// A second of output video.
    VideoSecond,
    /// One character of input text.
    Character,
}

impl BillingUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingUnit::Request => "request",
            BillingUnit::Image => "image",
            BillingUnit::Megapixel => "megapixel",
            BillingUnit::AudioSecond => "audio_second",
            BillingUnit::VideoSecond => "video_second",
            BillingUnit::Character => "character",
        }
    }
    pub fn parse(s: &str) -> Option<BillingUnit> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }
}

/// How many units an input will be billed, known before it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnitEstimate {
    /// One unit per request.
    #[default]
    PerRequest,
    /// The value of a numeric input field (`num_images`), `default` when absent.
    Field { field: String, default: f64 },
    /// The number of characters of a string input field (`text`).
    Length { field: String },
    /// Depends on what the request produces or fetches (an audio file's length): only a caller who knows the
    /// quantity can estimate.
    Unknown,
}

/// An app's metering, declared by the app.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Billing {
    #[serde(default)]
    pub unit: BillingUnit,
    #[serde(default)]
    pub estimate: UnitEstimate,
}

impl Billing {
    /// The units this input will be billed, if the app's rule can tell before running it.
    pub fn estimate_units(&self, input: &Value) -> Option<f64> {
        match &self.estimate {
            UnitEstimate::PerRequest => Some(1.0),
            UnitEstimate::Field { field, default } => match input.get(field) {
                None | Some(Value::Null) => Some(*default),
                Some(v) => v.as_f64().filter(|x| x.is_finite() && *x >= 0.0),
            },
            UnitEstimate::Length { field } => {
                input.get(field).and_then(|v| v.as_str()).map(|s| s.chars().count() as f64)
            }
            UnitEstimate::Unknown => None,
        }
    }
    /// The units a successful request is billed when its app reported none.
    pub fn default_units(&self) -> f64 {
        if self.unit == BillingUnit::Request { 1.0 } else { 0.0 }
    }
}

/// An app's prices, in the book's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Price of one unit of the app's [`BillingUnit`].
    #[serde(default)]
    pub unit_price: f64,
    /// Price of one second of runner time (from start to completion of the attempt that finished the request).
    #[serde(default)]
    pub runner_second_price: f64,
}

impl Prices {
    fn check(&self, what: &str) -> Result<(), String> {
        for (name, v) in [("unit_price", self.unit_price), ("runner_second_price", self.runner_second_price)] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{what}: {name} must be a number ≥ 0, not {v}"));
            }
        }
        Ok(())
    }
}

/// One billion nano-units make one unit of currency: costs are stored as integers of nano-units.
pub const NANOS: f64 = 1e9;

/// The cost of a request in nano-units of currency.
pub fn cost_nanos(unit_price: f64, units: f64, runner_second_price: f64, runner_ms: i64) -> i64 {
    let c = unit_price * units + runner_second_price * (runner_ms.max(0) as f64 / 1000.0);
    (c * NANOS).round() as i64
}

/// Nano-units to currency units.
pub fn from_nanos(n: i64) -> f64 {
    n as f64 / NANOS
}

/// The operator's prices: a default for every app and per-app prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceBook {
    /// ISO 4217 code the prices are in (display only).
    #[serde(default = "usd")]
    pub currency: String,
    /// Prices of apps the book does not name.
    #[serde(default)]
    pub default: Prices,
    /// Prices by app id (`owner/alias`).
    #[serde(default)]
    pub apps: BTreeMap<String, Prices>,
}

fn usd() -> String {
    "USD".into()
}

impl Default for PriceBook {
    fn default() -> Self {
        PriceBook { currency: usd(), default: Prices::default(), apps: BTreeMap::new() }
    }
}

impl PriceBook {
    /// Parses a price book from TOML:
    ///
    /// ```toml
    /// currency = "USD"
    /// [default]
    /// runner_second_price = 0.0002
    /// [apps."darkroom/whisper"]
    /// unit_price = 0.0001   # per audio second
    /// ```
    pub fn from_toml(text: &str) -> Result<PriceBook, String> {
        let book: PriceBook = toml::from_str(text).map_err(|e| format!("price book: {e}"))?;
        book.default.check("default")?;
        for (app, p) in &book.apps {
            p.check(app)?;
        }
        if book.currency.len() != 3 || !book.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(format!("price book: currency must be an ISO 4217 code such as USD, not '{}'", book.currency));
        }
        Ok(book)
    }
    pub fn prices(&self, app_id: &str) -> Prices {
        self.apps.get(app_id).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn estimates_follow_the_rule() {
        let per = Billing::default();
        assert_eq!(per.estimate_units(&json!({})), Some(1.0));
        let f = Billing {
            unit: BillingUnit::Image,
            estimate: UnitEstimate::Field { field: "num_images".into(), default: 1.0 },
        };
        assert_eq!(f.estimate_units(&json!({"num_images": 3})), Some(3.0));
        assert_eq!(f.estimate_units(&json!({})), Some(1.0));
        assert_eq!(f.estimate_units(&json!({"num_images": "x"})), None);
        assert_eq!(f.default_units(), 0.0);
        let l = Billing { unit: BillingUnit::Character, estimate: UnitEstimate::Length { field: "text".into() } };
        assert_eq!(l.estimate_units(&json!({"text": "héllo"})), Some(5.0));
        let u = Billing { unit: BillingUnit::AudioSecond, estimate: UnitEstimate::Unknown };
        assert_eq!(u.estimate_units(&json!({"audio_url": "x"})), None);
    }

    #[test]
    fn costs_are_exact_in_nanos() {
        assert_eq!(cost_nanos(0.0001, 7.5, 0.0, 12_345), 750_000);
        assert_eq!(cost_nanos(0.0, 0.0, 0.002, 1_500), 3_000_000);
        assert_eq!(from_nanos(3_000_000), 0.003);
    }

    #[test]
    fn price_book_parses_and_refuses_nonsense() {
        let b = PriceBook::from_toml(
            "currency = \"EUR\"\n[default]\nrunner_second_price = 0.001\n[apps.\"darkroom/whisper\"]\nunit_price = 0.0001\n",
        )
        .unwrap();
        assert_eq!(b.prices("darkroom/whisper").unit_price, 0.0001);
        assert_eq!(b.prices("darkroom/whisper").runner_second_price, 0.0);
        assert_eq!(b.prices("other/app").runner_second_price, 0.001);
        assert!(PriceBook::from_toml("[default]\nunit_price = -1\n").unwrap_err().contains("unit_price"));
        assert!(PriceBook::from_toml("[default]\nunit_prize = 1\n").is_err());
        assert!(PriceBook::from_toml("currency = \"dollars\"\n").is_err());
    }
}
