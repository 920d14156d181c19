//! What a policy can read of a request's encryption context, found from its JSON form when
//! policies change. The decision cache keys a decision by exactly these reads.

use std::collections::BTreeSet;

/// What a set of policies can read of a request's encryption context. A decision depends on
/// the encryption context through these reads alone, so requests that agree on them (and on
/// every other input) get the same decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum EncryptionReads {
    /// Only the entries with these names, each through
    /// `context.encryption_context.hasTag("name")` or `.getTag("name")` with a literal name.
    Entries(BTreeSet<String>),
    /// Any entry: a name computed at evaluation time, or the entity used in another way.
    All,
}

impl EncryptionReads {
    pub(super) fn none() -> Self {
        Self::Entries(BTreeSet::new())
    }

    pub(super) fn add(&mut self, other: &Self) {
        match (&mut *self, other) {
            (Self::All, _) => {}
            (_, Self::All) => *self = Self::All,
            (Self::Entries(mine), Self::Entries(theirs)) => mine.extend(theirs.iter().cloned()),
        }
    }
}

/// The context attribute holding the encryption context's entity (see [`super::SCHEMA`]).
pub(super) const ENCRYPTION_ATTR: &str = "encryption_context";
/// The entity type of the encryption context (see [`super::SCHEMA`]).
pub(super) const ENCRYPTION_TYPE: &str = "EncryptionContext";

/// What `policy` can read of the encryption context, from its JSON form: `Entries` only when
/// every use of `context` is `context.<attr>` for another attribute, `context has <attr>`, or
/// a tag test or lookup on `context.encryption_context` with a literal name, and no string
/// in the policy names the `EncryptionContext` type (an entity literal, an `is` test). Any
/// other form, or a policy that has no JSON form, reads `All`.
pub(super) fn encryption_reads(policy: &cedar_policy::Policy) -> EncryptionReads {
    let Ok(json) = policy.to_json() else {
        return EncryptionReads::All;
    };
    let mut names = BTreeSet::new();
    if only_literal_reads(&json, &mut names) {
        EncryptionReads::Entries(names)
    } else {
        EncryptionReads::All
    }
}

/// Walks a policy's JSON, adding the literal entry names read from the encryption context to
/// `names`; false when the encryption context may be read in any other way.
fn only_literal_reads(v: &serde_json::Value, names: &mut BTreeSet<String>) -> bool {
    use serde_json::Value;
    let is_var_context = |e: Option<&Value>| {
        e.and_then(|e| e.get("Var"))
            .is_some_and(|var| var == "context")
    };
    match v {
        Value::String(text) => !text.contains(ENCRYPTION_TYPE),
        Value::Array(items) => items.iter().all(|x| only_literal_reads(x, names)),
        Value::Object(fields) => {
            if let (1, Some((op, arg))) = (fields.len(), fields.iter().next()) {
                match op.as_str() {
                    "Var" => return arg != "context",
                    // A record literal: its keys are the policy author's, its values are
                    // expressions.
                    "Record" => {
                        return arg
                            .as_object()
                            .is_some_and(|m| m.values().all(|x| only_literal_reads(x, names)))
                    }
                    "." | "has" if is_var_context(arg.get("left")) => {
                        let Some(attr) = arg.get("attr").and_then(Value::as_str) else {
                            return false;
                        };
                        return (op == "has" || attr != ENCRYPTION_ATTR)
                            && !attr.contains(ENCRYPTION_TYPE);
                    }
                    "hasTag" | "getTag" => {
                        let target = arg.get("left").and_then(|l| l.get("."));
                        let on_encryption = target.is_some_and(|t| {
                            is_var_context(t.get("left"))
                                && t.get("attr").is_some_and(|a| a == ENCRYPTION_ATTR)
                        });
                        if on_encryption {
                            return match arg
                                .get("right")
                                .and_then(|r| r.get("Value"))
                                .and_then(Value::as_str)
                            {
                                Some(name) => {
                                    names.insert(name.to_owned());
                                    true
                                }
                                None => false,
                            };
                        }
                    }
                    _ => {}
                }
            }
            fields.values().all(|x| only_literal_reads(x, names))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use cedar_policy::PolicySet;

    use super::*;

    fn reads(text: &str) -> EncryptionReads {
        let set = PolicySet::from_str(text).unwrap();
        let mut all = EncryptionReads::none();
        for p in set.policies() {
            all.add(&encryption_reads(p));
        }
        all
    }

    fn entries(names: &[&str]) -> EncryptionReads {
        EncryptionReads::Entries(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn literal_tag_reads_are_found() {
        assert_eq!(
            reads(include_str!(
                "../../../../examples/policies/messaging-tenant.cedar"
            )),
            entries(&["tenant"])
        );
        assert_eq!(
            reads(include_str!(
                "../../../../examples/policies/restricted-hours.cedar"
            )),
            entries(&[])
        );
        assert_eq!(
            reads(
                "permit(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"a\") && \
                 context.encryption_context.getTag(\"b\") == \"x\" && \
                 context has purpose && context.purpose == \"audit\" && \
                 context.time.hour_utc < 22 && context has encryption_context };\n\
                 forbid(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"c\") };"
            ),
            entries(&["a", "b", "c"])
        );
    }

    #[test]
    fn any_other_use_of_the_encryption_context_reads_all_of_it() {
        for text in [
            // A name computed at evaluation time.
            "permit(principal, action, resource) when { \
             principal.hasTag(\"k\") && \
             context.encryption_context.hasTag(principal.getTag(\"k\")) };",
            "permit(principal, action, resource) when { context has purpose && \
             context.encryption_context.getTag(context.purpose) == \"x\" };",
            // The entity itself compared, tested or named.
            "permit(principal, action, resource) when { \
             context.encryption_context == EncryptionContext::\"request\" };",
            "permit(principal, action, resource) when { \
             context.encryption_context is EncryptionContext };",
            "permit(principal, action, resource) when { \
             EncryptionContext::\"request\".hasTag(\"a\") };",
            "permit(principal, action, resource) when { \
             (if true then context.encryption_context \
              else context.encryption_context).hasTag(\"a\") };",
            // The whole context.
            "permit(principal, action, resource) when { context == context };",
            "permit(principal, action, resource) when { context has encryption_context.a };",
            // Record literals, whose keys may spell the operators this analysis looks for.
            "permit(principal, action, resource) when { \
             {Var: context.encryption_context}.Var.hasTag(\"a\") };",
            "permit(principal, action, resource) when { \
             {\"hasTag\": context}.hasTag.encryption_context.hasTag(\"a\") };",
        ] {
            let set = PolicySet::from_str(text).unwrap();
            for p in set.policies() {
                assert_eq!(encryption_reads(p), EncryptionReads::All, "{text}");
            }
        }
        // One policy reading all makes the whole slice read all.
        assert_eq!(
            reads(
                "permit(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"a\") };\n\
                 permit(principal, action, resource) when { context == context };"
            ),
            EncryptionReads::All
        );
    }
}
