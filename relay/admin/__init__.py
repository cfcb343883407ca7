"""
The operator's live view of a relay server (issue 16): which backends'
relay-clients are connected, what is in flight, what failed lately.

  - L{relay.admin.stats}: the statistics the broker feeds, bounded;
  - L{relay.admin.status}: the C{/api/status} snapshot;
  - L{relay.admin.web}: the admin port's resources and token check;
  - L{relay.admin.service}: L{attach_admin}, which turns it all on;
  - C{static/}: the page (HTML, CSS, JS), shipped as package data.

It is off unless C{--admin_port} is given, and then listens apart from
user traffic. docs/server.md ("The admin view") is the operator's guide.
"""

from relay.admin.service import admin_endpoint, attach_admin
from relay.admin.stats import AdminStats
from relay.admin.web import TokenCheck

__all__ = ["AdminStats", "TokenCheck", "admin_endpoint", "attach_admin"]
