package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// ErrAdminNeedsRoot is wrapped by the admin client's errors when the caller
// is not allowed on the admin socket: its mode keeps non-root callers out,
// and the agent refuses any caller but root by its peer credentials.
var ErrAdminNeedsRoot = errors.New("needs root")

// ErrAdminNoAgent is wrapped when no agent listens on the admin socket.
var ErrAdminNoAgent = errors.New("no pgward agent is listening")

// AdminClient talks to a running agent's admin socket.
type AdminClient struct {
	socket string
	hc     *http.Client
}

// NewAdminClient returns a client for the admin socket at path.
func NewAdminClient(path string) *AdminClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}
	return &AdminClient{socket: path, hc: &http.Client{Transport: tr}}
}

// AdminFilter narrows a session list; zero fields match everything.
type AdminFilter struct {
	Principal string
	UID       *uint32
	Upstream  string
}

// Sessions is GET /v1/sessions.
func (c *AdminClient) Sessions(ctx context.Context, f AdminFilter) (*AdminSessions, error) {
	q := url.Values{}
	if f.Principal != "" {
		q.Set("principal", f.Principal)
	}
	if f.Upstream != "" {
		q.Set("upstream", f.Upstream)
	}
	if f.UID != nil {
		q.Set("uid", strconv.FormatUint(uint64(*f.UID), 10))
	}
	u := "http://pgward/v1/sessions"
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	var out AdminSessions
	if _, err := c.do(req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// End is POST /v1/sessions/end. The reply lists the sessions ended and
// the ids that are no live session (not an error).
func (c *AdminClient) End(ctx context.Context, sids []string, reason string) (*AdminEndReply, error) {
	body, _ := json.Marshal(AdminEndRequest{SIDs: sids, Reason: reason})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://pgward/v1/sessions/end", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	var out AdminEndReply
	if _, err := c.do(req, &out, http.StatusNotFound); err != nil {
		return nil, err
	}
	return &out, nil
}

// do sends req and decodes a 200 (or an ok status) answer into out.
func (c *AdminClient) do(req *http.Request, out any, ok ...int) (int, error) {
	resp, err := c.hc.Do(req)
	if err != nil {
		switch {
		case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
			return 0, fmt.Errorf("%w: cannot open the admin socket %s (permission denied); run this as root", ErrAdminNeedsRoot, c.socket)
		case errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED):
			return 0, fmt.Errorf("%w on %s: is the agent running, and is this its admin.socket?", ErrAdminNoAgent, c.socket)
		}
		return 0, fmt.Errorf("admin socket %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("admin socket %s: read answer: %w", c.socket, err)
	}
	if resp.StatusCode == http.StatusOK || slices.Contains(ok, resp.StatusCode) {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("admin socket %s: invalid answer: %w", c.socket, err)
		}
		return resp.StatusCode, nil
	}
	var e adminError
	_ = json.Unmarshal(data, &e)
	if e.Error == "" {
		e.Error = resp.Status
	}
	if resp.StatusCode == http.StatusForbidden {
		return resp.StatusCode, fmt.Errorf("%w: %s", ErrAdminNeedsRoot, strings.TrimPrefix(e.Error, "needs root: "))
	}
	return resp.StatusCode, errors.New(e.Error)
}
