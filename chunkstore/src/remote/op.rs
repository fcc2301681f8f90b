//! The kinds of object-store request the wrappers ([`FaultyStore`](super::FaultyStore),
//! [`MeteredStore`](super::MeteredStore)) tell apart.

use std::fmt;

use object_store::GetOptions;

/// One kind of object-store request. Copies, renames and multipart uploads count as [`Op::Put`]
/// (they create an object); a `get_opts` with `head` set is [`Op::Head`], with a range
/// [`Op::GetRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Get,
    GetRange,
    Put,
    Delete,
    List,
    Head,
}

impl Op {
    pub const COUNT: usize = 6;
    pub const ALL: [Op; Op::COUNT] = [
        Op::Get,
        Op::GetRange,
        Op::Put,
        Op::Delete,
        Op::List,
        Op::Head,
    ];

    /// Dense index in `0..Op::COUNT`, for per-op arrays.
    pub const fn index(self) -> usize {
        match self {
            Op::Get => 0,
            Op::GetRange => 1,
            Op::Put => 2,
            Op::Delete => 3,
            Op::List => 4,
            Op::Head => 5,
        }
    }

    /// The label value used in metrics (`op="get_range"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::List => "list",
            Op::Head => "head",
        }
    }

    /// The kind of a `get_opts` request.
    pub fn of_get(options: &GetOptions) -> Op {
        if options.head {
            Op::Head
        } else if options.range.is_some() {
            Op::GetRange
        } else {
            Op::Get
        }
    }

    /// Whether the request returns object bytes (the ones a corrupting store may flip).
    pub const fn reads_data(self) -> bool {
        matches!(self, Op::Get | Op::GetRange)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_distinct() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
        }
    }

    #[test]
    fn get_options_classify() {
        assert_eq!(Op::of_get(&GetOptions::new()), Op::Get);
        assert_eq!(
            Op::of_get(&GetOptions::new().with_range(Some(0..4u64))),
            Op::GetRange
        );
        assert_eq!(Op::of_get(&GetOptions::new().with_head(true)), Op::Head);
    }
}
