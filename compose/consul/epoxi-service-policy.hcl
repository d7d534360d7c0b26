# What every Epoxi service needs from Consul (the token consul-acl-init creates for them):
# register and check its own services, discover the others, and keep its records and
# locks under epoxi/ in KV with sessions.
service_prefix "epoxi-" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
agent_prefix "" {
  policy = "read"
}
key_prefix "epoxi/" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
