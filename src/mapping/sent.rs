//! What a request Totango accepted sets there, read back from the request
//! the mapping made: the account's and the user's attributes, and whether
//! it was an activity. Storage keeps this for the operator's per-account and
//! per-user pages; the wire names stay here.

use super::TotangoRequest;

/// What one accepted request set in Totango.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sets<'a> {
    pub service_id: &'a str,
    pub account_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    /// Account attributes by their parameter name (`sdr_odn`, `sdr_o.*`).
    pub account: Vec<(&'a str, &'a str)>,
    /// User attributes by their parameter name (`sdr_u.*`).
    pub user: Vec<(&'a str, &'a str)>,
    /// An activity (track, page): counted for its account and its user.
    pub activity: bool,
}

impl TotangoRequest {
    /// What this request sets when Totango accepts it.
    pub fn sets(&self) -> Sets<'_> {
        let get = |k: &str| {
            self.params
                .get(k)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        let mut sets = Sets {
            service_id: get("sdr_s").unwrap_or_default(),
            account_id: get("sdr_o"),
            user_id: get("sdr_u"),
            account: Vec::new(),
            user: Vec::new(),
            activity: get("sdr_a").is_some(),
        };
        for (name, value) in &self.params {
            if name == "sdr_odn" || name.starts_with("sdr_o.") {
                sets.account.push((name, value));
            } else if name.starts_with("sdr_u.") {
                sets.user.push((name, value));
            }
        }
        sets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&str, &str)]) -> TotangoRequest {
        TotangoRequest {
            params: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn group_sets_account_attributes_only() {
        let r = request(&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_odn", "Acme"),
            ("sdr_u", "u1"),
            ("sdr_o.Status", "Paying"),
        ]);
        let s = r.sets();
        assert_eq!(s.service_id, "SP-1");
        assert_eq!(s.account_id, Some("acme"));
        assert_eq!(s.user_id, Some("u1"));
        assert_eq!(
            s.account,
            vec![("sdr_odn", "Acme"), ("sdr_o.Status", "Paying")]
        );
        assert!(s.user.is_empty());
        assert!(!s.activity);
    }

    #[test]
    fn identify_sets_user_attributes_and_an_activity_sets_none() {
        let r = request(&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_u", "u1"),
            ("sdr_u.email", "a@b"),
        ]);
        assert_eq!(r.sets().user, vec![("sdr_u.email", "a@b")]);
        let a = request(&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_u", "u1"),
            ("sdr_a", "Viewed X Page"),
            ("sdr_m", "X"),
        ]);
        let s = a.sets();
        assert!(s.activity && s.account.is_empty() && s.user.is_empty());
    }
}
