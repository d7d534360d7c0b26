# Consul's settings for docker-compose.yml (its initial management token comes from the
# consul_management_token secret, written into a second config file when the container starts).

# Every request needs a token; a missing one is the anonymous token, which may do nothing.
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = false
}

# The GRPC health checks of the Epoxi services (GRPCUseTLS, TLSServerName) verify them with the
# mesh's CA and present Consul's certificate, since the services require client certificates.
enable_agent_tls_for_checks = true

tls {
  defaults {
    ca_file   = "/run/secrets/epoxi_ca"
    cert_file = "/run/secrets/consul_cert"
    key_file  = "/run/secrets/consul_key"
  }
}

ui_config {
  enabled = true
}
