//! Which event types a subscriber wants: exact types and prefixes.

use crate::event::validate_type;

/// Most filters one subscription may carry.
pub const MAX_FILTERS: usize = 64;

/// Exact types and prefixes; none means every type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    exact: Vec<String>,
    /// Stored with the trailing dot: `cost.*` is kept as `cost.`.
    prefixes: Vec<String>,
}

/// A filter pattern that is neither an event type nor a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "types[{index}]: {pattern:?} is neither an event type (cost.updated) nor a prefix (cost.*)"
    )]
    Pattern { index: usize, pattern: String },
    #[error("types: {len} filters is more than the limit of {MAX_FILTERS}")]
    TooMany { len: usize },
}

impl TypeFilter {
    /// Every type.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses patterns: `cost.updated` (exact), `cost.*` or `ml.training.*`
    /// (prefix), `*` (everything). No patterns means everything.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, FilterError> {
        if patterns.len() > MAX_FILTERS {
            return Err(FilterError::TooMany {
                len: patterns.len(),
            });
        }
        let mut filter = Self::default();
        for (index, pattern) in patterns.iter().enumerate() {
            let pattern = pattern.as_ref().trim();
            let bad = || FilterError::Pattern {
                index,
                pattern: pattern.chars().take(140).collect(),
            };
            if pattern == "*" {
                return Ok(Self::all());
            }
            if let Some(prefix) = pattern.strip_suffix(".*") {
                // "cost" alone is a valid first word; check it as if a type.
                validate_type(&format!("{prefix}.x")).map_err(|_| bad())?;
                filter.prefixes.push(format!("{prefix}."));
            } else {
                validate_type(pattern).map_err(|_| bad())?;
                filter.exact.push(pattern.to_string());
            }
        }
        Ok(filter)
    }

    /// The patterns this filter was parsed from; `["*"]` for every type.
    pub fn patterns(&self) -> Vec<String> {
        if self.is_all() {
            return vec!["*".into()];
        }
        self.exact
            .iter()
            .cloned()
            .chain(self.prefixes.iter().map(|p| format!("{p}*")))
            .collect()
    }

    pub fn is_all(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.is_all()
            || self.exact.iter().any(|t| t == event_type)
            || self.prefixes.iter().any(|p| event_type.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let f = TypeFilter::parse(&["cost.*", "alert.created"]).expect("valid");
        assert!(f.matches("cost.updated"));
        assert!(f.matches("cost.forecast.generated"));
        assert!(f.matches("alert.created"));
        assert!(!f.matches("alert.resolved"));
        assert!(!f.matches("costs.updated"));
        assert!(TypeFilter::parse(&["*"]).expect("valid").is_all());
        assert!(TypeFilter::parse::<&str>(&[]).expect("valid").is_all());
        assert!(
            TypeFilter::parse(&["ml.training.*"])
                .expect("valid")
                .matches("ml.training.started")
        );
        for bad in ["Cost.*", "cost", "cost.", ".*", "cost.**", "*.updated"] {
            assert!(TypeFilter::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
