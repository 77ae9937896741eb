ALTER TABLE api_keys ADD COLUMN webhook_dialect TEXT;
