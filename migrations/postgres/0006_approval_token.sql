-- The gateway-minted token a call awaiting approval was made with: revoking it before the
-- decision keeps the call from running, as revoking its agent does.
ALTER TABLE approvals ADD COLUMN token_id TEXT;
