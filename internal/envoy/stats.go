package envoy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
)

// adminGet asks Envoy's admin (on its unix socket) for path.
func (s *Supervisor) adminGet(ctx context.Context, path string) ([]byte, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", s.AdminSocket)
		},
	}}
	defer client.CloseIdleConnections()
	// The host part is ignored: every request goes to the socket.
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://envoy-admin"+path, nil)
	if err != nil {
		return nil, fmt.Errorf("asking envoy's admin for %s: %w", path, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking envoy's admin for %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminBody))
	if err != nil {
		return nil, fmt.Errorf("reading envoy's admin answer for %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("asking envoy's admin for %s: %s: %.200s", path, resp.Status, b)
	}
	return b, nil
}

// maxAdminBody caps what is read of an admin answer (a stats answer is a
// few hundred bytes per filter chain).
const maxAdminBody = 16 << 20

// activeStatsPath asks for the connection_limit filters' gauges of open
// connections: every chain that lets connections through has one, named
// after the chain (PROJECT/KIND/PORT).
const activeStatsPath = `/stats?format=json&filter=^connection_limit\..*\.active_connections$`

// ActiveConnections reads Envoy's open connections by project: the sum of
// the active_connections gauges of the project's chains.
func (s *Supervisor) ActiveConnections(ctx context.Context) (map[string]float64, error) {
	b, err := s.adminGet(ctx, activeStatsPath)
	if err != nil {
		return nil, err
	}
	return activeByProject(b)
}

// activeByProject sums Envoy's stats answer
// {"stats":[{"name":"connection_limit.PROJECT/KIND/PORT.active_connections","value":N},...]}
// by project. Stats of other names are skipped.
func activeByProject(b []byte) (map[string]float64, error) {
	var r struct {
		Stats []struct {
			Name  string
			Value float64
		}
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("reading envoy's connection stats: %w", err)
	}
	out := map[string]float64{}
	for _, st := range r.Stats {
		chain, ok := strings.CutPrefix(st.Name, "connection_limit.")
		if !ok {
			continue
		}
		chain, ok = strings.CutSuffix(chain, ".active_connections")
		if !ok {
			continue
		}
		project, _, ok := strings.Cut(chain, "/")
		if !ok || project == "" {
			continue
		}
		out[project] += st.Value
	}
	return out, nil
}
