"""Cloud commands: decoded (pure), weighed against the policy (gateway.core.policy), carried
out on the device link, answered and recorded."""
