-- A repeated call looks up whether it waited for approval by its invocation.
CREATE INDEX approvals_invocation ON approvals (tenant_id, invocation_id);
