"""The SMTP ingress: mail from applications, relayed as written through the router."""
