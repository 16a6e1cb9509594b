//! Per-token prices in integer nanoTON.
//!
//! `cost = ((prompt_tokens − cached_tokens) × prompt_mult
//!         + cached_tokens × cached_mult + completion_tokens × completion_mult)
//!         × base_price × coefficient`
//!
//! Cached tokens are prompt tokens the worker did not compute: it read
//! their keys and values from its prefix cache, or from another choice of
//! the same request.
//!
//! Multipliers and coefficients are integers in **parts per thousand**
//! ([`PER_MILLE`]): `1000` means ×1, `1250` means ×1.25, `3000` means ×3.
//! The base price is whole nanoTON per token. The product is computed
//! exactly in `u128` with checked arithmetic and divided once by 10⁶ at the
//! end, **rounding up** to the next nanoTON, so a job that used any tokens at
//! a non-zero price costs at least 1 nanoTON, and splitting work into several
//! jobs never costs less than doing it in one (at most 1 nanoTON more per job).

use crate::coins::{Coins, MAX_COINS};
use crate::error::{Error, Result};

/// The unit of multipliers and coefficients: 1000 = ×1.
pub const PER_MILLE: u32 = 1000;

/// A worker's price list (the coefficient is separate: workers announce it in
/// gossip and callers cap it per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    /// nanoTON per token before multipliers and coefficient.
    pub base_nano_per_token: u64,
    /// Prompt-token multiplier, parts per thousand.
    pub prompt_mult_milli: u32,
    /// Completion-token multiplier, parts per thousand.
    pub completion_mult_milli: u32,
    /// Multiplier of prompt tokens the worker read from its cache instead
    /// of computing, parts per thousand (default 100: a tenth of a base
    /// token, Cocoon and the large APIs also bill them apart).
    #[serde(default = "default_cached_mult_milli")]
    pub cached_mult_milli: u32,
}

/// The cached-token multiplier when a price list names none.
pub const DEFAULT_CACHED_MULT_MILLI: u32 = 100;

fn default_cached_mult_milli() -> u32 {
    DEFAULT_CACHED_MULT_MILLI
}

impl Price {
    /// What `prompt_tokens` in and `completion_tokens` out cost at
    /// `coefficient_milli` (parts per thousand), rounded up to whole nanoTON.
    pub fn cost(
        &self,
        coefficient_milli: u32,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Coins> {
        self.cost_cached(coefficient_milli, prompt_tokens, 0, completion_tokens)
    }

    /// [`Price::cost`] when `cached_tokens` of the prompt were read from a
    /// cache (at most `prompt_tokens`; more count as `prompt_tokens`).
    pub fn cost_cached(
        &self,
        coefficient_milli: u32,
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Coins> {
        let overflow = || Error::Overflow("Price::cost");
        let cached = cached_tokens.min(prompt_tokens);
        let weighted = [
            (prompt_tokens - cached, self.prompt_mult_milli),
            (cached, self.cached_mult_milli),
            (completion_tokens, self.completion_mult_milli),
        ]
        .into_iter()
        .try_fold(0u128, |sum, (tokens, mult)| {
            u128::from(tokens)
                .checked_mul(u128::from(mult))
                .and_then(|t| sum.checked_add(t))
        })
        .ok_or_else(overflow)?;
        let scaled = weighted
            .checked_mul(u128::from(self.base_nano_per_token))
            .and_then(|v| v.checked_mul(u128::from(coefficient_milli)))
            .ok_or_else(overflow)?;
        let divisor = u128::from(PER_MILLE) * u128::from(PER_MILLE);
        let nano = scaled.div_ceil(divisor);
        if nano > MAX_COINS {
            return Err(Error::CoinsTooLarge(nano));
        }
        Ok(Coins(nano))
    }

    /// The most a request can cost: its prompt plus `max_tokens` of completion.
    /// Gateways reserve this against the lane before dispatch.
    pub fn worst_case(
        &self,
        coefficient_milli: u32,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<Coins> {
        self.cost(coefficient_milli, prompt_tokens, max_tokens)
    }
}

/// Whether a worker announcing `worker_coefficient_milli` may serve a request
/// whose caller accepts at most `max_coefficient_milli`.
pub fn coefficient_acceptable(worker_coefficient_milli: u32, max_coefficient_milli: u32) -> bool {
    worker_coefficient_milli <= max_coefficient_milli
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PRICE: Price = Price {
        base_nano_per_token: 1_000,
        prompt_mult_milli: 1_000,
        completion_mult_milli: 3_000,
        cached_mult_milli: 100,
    };

    #[test]
    fn worked_examples() {
        // 100 prompt + 50 completion tokens at 1000 nano/token, ×1: 100 + 150 = 250 weighted tokens.
        assert_eq!(PRICE.cost(1_000, 100, 50).unwrap(), Coins(250_000));
        // ×1.25
        assert_eq!(PRICE.cost(1_250, 100, 50).unwrap(), Coins(312_500));
        // Fractions round up: 1 token at 1 nano ×0.001 is 0.001 nano -> 1 nano.
        let tiny = Price {
            base_nano_per_token: 1,
            prompt_mult_milli: 1_000,
            completion_mult_milli: 1_000,
            cached_mult_milli: 1_000,
        };
        assert_eq!(tiny.cost(1, 1, 0).unwrap(), Coins(1));
        assert_eq!(tiny.cost(1_000, 0, 0).unwrap(), Coins(0));
        assert_eq!(
            PRICE.worst_case(1_000, 10, 20).unwrap(),
            PRICE.cost(1_000, 10, 20).unwrap()
        );
        assert!(coefficient_acceptable(1_000, 1_500));
        assert!(!coefficient_acceptable(2_000, 1_500));
    }

    /// Cached prompt tokens cost their own multiplier; a claim of more
    /// cached tokens than the prompt has counts the prompt only.
    #[test]
    fn cached_prompt_tokens_cost_their_own_multiplier() {
        // 100 prompt tokens, 60 of them cached, 50 completion tokens at
        // 1000 nano/token: 40 + 60 × 0.1 + 150 = 196 weighted tokens.
        assert_eq!(
            PRICE.cost_cached(1_000, 100, 60, 50).unwrap(),
            Coins(196_000)
        );
        assert_eq!(
            PRICE.cost_cached(1_000, 100, 0, 50).unwrap(),
            PRICE.cost(1_000, 100, 50).unwrap()
        );
        assert_eq!(
            PRICE.cost_cached(1_000, 100, 500, 50).unwrap(),
            PRICE.cost_cached(1_000, 100, 100, 50).unwrap()
        );
        // A price list written before the field reads the default.
        let old: Price = serde_json::from_str(
            r#"{"base_nano_per_token":1,"prompt_mult_milli":1000,"completion_mult_milli":1000}"#,
        )
        .unwrap();
        assert_eq!(old.cached_mult_milli, DEFAULT_CACHED_MULT_MILLI);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let huge = Price {
            base_nano_per_token: u64::MAX,
            prompt_mult_milli: u32::MAX,
            completion_mult_milli: u32::MAX,
            cached_mult_milli: u32::MAX,
        };
        assert!(huge.cost(u32::MAX, u64::MAX, u64::MAX).is_err());
    }

    fn price() -> impl Strategy<Value = Price> {
        (0u64..1_000_000, 0u32..10_000, 0u32..10_000, 0u32..10_000).prop_map(|(b, p, c, k)| Price {
            base_nano_per_token: b,
            prompt_mult_milli: p,
            completion_mult_milli: c,
            cached_mult_milli: k,
        })
    }

    proptest! {
        #[test]
        fn cost_grows_with_tokens_and_coefficient(
            pr in price(), coef in 0u32..10_000, p in 0u64..1_000_000, c in 0u64..1_000_000,
        ) {
            let base = pr.cost(coef, p, c).unwrap();
            prop_assert!(pr.cost(coef, p + 1, c).unwrap() >= base);
            prop_assert!(pr.cost(coef, p, c + 1).unwrap() >= base);
            prop_assert!(pr.cost(coef + 1, p, c).unwrap() >= base);
        }

        #[test]
        fn splitting_a_job_costs_at_most_one_nano_more_per_part(
            pr in price(), coef in 0u32..10_000,
            p1 in 0u64..1_000_000, c1 in 0u64..1_000_000, p2 in 0u64..1_000_000, c2 in 0u64..1_000_000,
        ) {
            let whole = pr.cost(coef, p1 + p2, c1 + c2).unwrap().nano();
            let parts = pr.cost(coef, p1, c1).unwrap().nano() + pr.cost(coef, p2, c2).unwrap().nano();
            prop_assert!(parts >= whole);
            prop_assert!(parts <= whole + 1);
        }

        #[test]
        fn never_panics(b: u64, pm: u32, cm: u32, coef: u32, p: u64, c: u64) {
            let pr = Price { base_nano_per_token: b, prompt_mult_milli: pm, completion_mult_milli: cm, cached_mult_milli: pm };
            let _ = pr.cost(coef, p, c);
            let _ = pr.cost_cached(coef, p, c, c);
        }
    }
}
