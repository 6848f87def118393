//! `admin`: the admin listener, never on the public address.

use super::Validator;
use crate::config::{raw, Admin, Listen};

pub(super) fn validate(
    v: &mut Validator<'_>,
    a: raw::Admin,
    listen: Option<&Listen>,
) -> Option<Admin> {
    let address = v.addr("admin.address", a.address, "127.0.0.1:9901");
    if let (Some(l), Some(a)) = (listen, address) {
        if l.address == a && a.port() != 0 {
            v.problem(
                "admin.address",
                "the admin listener must not share the public address",
            );
        }
    }
    Some(Admin { address: address? })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};

    #[test]
    // The admin endpoints must never be reachable on the public listener;
    // port 0 (chosen at bind time) never collides.
    fn admin_never_shares_the_public_address() {
        let both = |listen: &str, admin: &str| {
            format!("{BASE}listen:\n  address: {listen}\nadmin:\n  address: {admin}\n")
        };
        let e = problems(&both("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(
            e.contains("gateway.yaml:15:12: admin.address: the admin listener must not share the public address"),
            "{e}"
        );
        assert!(load(&both("127.0.0.1:0", "127.0.0.1:0")).is_ok());
        let e = problems(&both("127.0.0.1:8080", "localhost"));
        assert!(
            e.contains("admin.address: invalid address \"localhost\""),
            "{e}"
        );
    }
}
