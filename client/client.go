// Package client is the Go client of vmegress's local API: the unix socket
// (default /run/vmegress/api.sock) the daemon serves for orchestrators that
// place sandboxes and set their egress policy at runtime. The vmegress CLI
// uses it too.
//
// A life cycle:
//
//	c := client.New("/run/vmegress/api.sock")
//	pl, err := c.PutProject(ctx, "sbx-42", client.ProjectSpec{Owner: &jailerUID})
//	// start the microVM with pl.TAP, pl.MAC and pl.KernelIP
//	...
//	_, err = c.DeleteProject(ctx, "sbx-42")
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"net"
	"net/http"
	"net/url"
	"syscall"
)

// DefaultSocket is the API socket of a default installation.
const DefaultSocket = "/run/vmegress/api.sock"

// Client talks to one daemon's API socket.
type Client struct {
	// Socket is the unix socket's path.
	Socket string
	// HTTP is the transport (zero: one that dials Socket).
	HTTP *http.Client
}

// New returns a client of the daemon listening on socket.
func New(socket string) *Client { return &Client{Socket: socket} }

func (c *Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	sock := c.Socket
	c.HTTP = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	return c.HTTP
}

// Error is an answer other than success.
type Error struct {
	Status  int
	Message string
	Field   string
}

func (e *Error) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%s (%s)", e.Message, e.Field)
	}
	return e.Message
}

// IsUnavailable reports whether err means no daemon answers on the socket
// (absent, or nothing listening): the caller may act without it.
func IsUnavailable(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if raw, ok := in.(rawBody); ok {
		body = bytes.NewReader(raw)
	} else if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encoding the request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vmegress"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return fmt.Errorf("calling the vmegress API at %s: %w", c.Socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("reading the API's answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
		}
		return &Error{Status: resp.StatusCode, Message: eb.Error, Field: eb.Field}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("decoding the API's answer: %w", err)
		}
	}
	return nil
}

// PutProject places (or updates) a project. The same spec twice is one
// project, unchanged (Changed false).
func (c *Client) PutProject(ctx context.Context, name string, spec ProjectSpec) (*Placement, error) {
	var p Placement
	if err := c.do(ctx, http.MethodPut, "/v1/projects/"+url.PathEscape(name), spec, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// DeleteProject takes a project off the host: TAP, ruleset elements, state.
func (c *Client) DeleteProject(ctx context.Context, name string) (*Removed, error) {
	var r Removed
	if err := c.do(ctx, http.MethodDelete, "/v1/projects/"+url.PathEscape(name), nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Projects lists every project: placed, named by the config file, or
// given a policy through the API.
func (c *Client) Projects(ctx context.Context) ([]Project, error) {
	var ps []Project
	if err := c.do(ctx, http.MethodGet, "/v1/projects", nil, &ps); err != nil {
		return nil, err
	}
	return ps, nil
}

// Project returns one project.
func (c *Client) Project(ctx context.Context, name string) (*Project, error) {
	var p Project
	if err := c.do(ctx, http.MethodGet, "/v1/projects/"+url.PathEscape(name), nil, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// SetPolicy replaces a project's policy; new connections are decided by it
// once the call returns, open ones follow on_policy_change.
func (c *Client) SetPolicy(ctx context.Context, name string, p Policy) (*PolicyResult, error) {
	var r PolicyResult
	if err := c.do(ctx, http.MethodPut, "/v1/projects/"+url.PathEscape(name)+"/policy", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// SetPolicyDocument is SetPolicy with the policy as a JSON (or YAML)
// document, validated by the daemon as written (`vmegress policy set`).
func (c *Client) SetPolicyDocument(ctx context.Context, name string, doc []byte) (*PolicyResult, error) {
	var r PolicyResult
	if err := c.do(ctx, http.MethodPut, "/v1/projects/"+url.PathEscape(name)+"/policy", rawBody(doc), &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// rawBody is sent as is.
type rawBody []byte

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	if err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// Events follows the decision and change stream until ctx ends or the
// daemon drops the reader (a "lagged" event comes last then). Each item is
// an event or the error that ended the stream.
func (c *Client) Events(ctx context.Context, f EventFilter) iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		q := url.Values{}
		if f.Project != "" {
			q.Set("project", f.Project)
		}
		if f.Verdict != "" {
			q.Set("verdict", f.Verdict)
		}
		u := "http://vmegress/v1/events"
		if len(q) > 0 {
			u += "?" + q.Encode()
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			yield(Event{}, err)
			return
		}
		resp, err := c.http().Do(req)
		if err != nil {
			yield(Event{}, fmt.Errorf("calling the vmegress API at %s: %w", c.Socket, err))
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			var eb ErrorBody
			json.Unmarshal(b, &eb)
			yield(Event{}, &Error{Status: resp.StatusCode, Message: eb.Error, Field: eb.Field})
			return
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var e Event
			line := append([]byte(nil), sc.Bytes()...)
			if err := json.Unmarshal(line, &e); err != nil {
				if !yield(Event{}, fmt.Errorf("decoding an event: %w", err)) {
					return
				}
				continue
			}
			e.Raw = line
			if !yield(e, nil) {
				return
			}
		}
		if err := sc.Err(); err != nil && ctx.Err() == nil {
			yield(Event{}, fmt.Errorf("reading the event stream: %w", err))
		}
	}
}

// Explain returns the verdicts for a connection, as the data plane would
// decide it, from the daemon's compiled policy.
func (c *Client) Explain(ctx context.Context, req ExplainRequest) ([]Explanation, error) {
	var out []Explanation
	if err := c.do(ctx, http.MethodPost, "/v1/explain", req, &out); err != nil {
		return nil, err
	}
	return out, nil
}
