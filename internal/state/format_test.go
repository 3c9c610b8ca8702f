package state

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"net/netip"
)

func u32(v uint32) *uint32 { return &v }

func TestFormatRoundTrip(t *testing.T) {
	s := &State{Projects: map[string]Project{
		"alpha": {Name: "alpha", TAP: "tap-alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30"), MAC: MAC("alpha"), Egress: EgressProxy, SSHPort: 2201, Owner: u32(1000), Group: u32(0)},
		"beta":  {Name: "beta", TAP: "tap-beta", Subnet: netip.MustParsePrefix("172.31.0.4/30"), MAC: MAC("beta"), Egress: EgressNAT},
	}}
	b, err := Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	want := header + "\n" +
		"alpha\ttap-alpha\t172.31.0.0/30\t" + MAC("alpha") + "\tproxy\t2201\t1000\t0\n" +
		"beta\ttap-beta\t172.31.0.4/30\t" + MAC("beta") + "\tnat\t0\t-\t-\n"
	if string(b) != want {
		t.Errorf("Marshal:\n%s\nwant:\n%s", b, want)
	}
	got, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, s) {
		t.Errorf("round trip: %+v, want %+v", got, s)
	}
	// A tab in a field would shift every later one: refused.
	bad := &State{Projects: map[string]Project{"x": {Name: "x\ty", TAP: "t", Subnet: s.Projects["beta"].Subnet, MAC: "m", Egress: EgressNAT}}}
	if _, err := Marshal(bad); err == nil {
		t.Error("Marshal accepted a name with a tab")
	}
}

func TestUnmarshalErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"alpha\ttap\n", "line 1: not a vmegress state file"},
		{header + "\nalpha\ttap-alpha\n", "line 2: want 8 tab-separated fields"},
		{header + "\na\tt\t172.31.0.0/33\tm\tproxy\t0\t-\t-\n", `line 2: project "a": subnet`},
		{header + "\na\tt\t172.31.0.0/30\tm\topen\t0\t-\t-\n", `egress "open"`},
		{header + "\na\tt\t172.31.0.0/30\tm\tnat\t70000\t-\t-\n", "ssh_port"},
		{header + "\na\tt\t172.31.0.0/30\tm\tnat\t0\t-\t-\na\tt\t172.31.0.0/30\tm\tnat\t0\t-\t-\n", `line 3: project "a" twice`},
	} {
		_, err := Unmarshal([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Unmarshal(%q) = %v, want an error with %q", tc.in, err, tc.want)
		}
	}
}

// TestLegacyJSON: a state directory of the JSON era is read, and the next
// write replaces it with the line format.
func TestLegacyJSON(t *testing.T) {
	st := Store{Dir: t.TempDir()}
	legacy := `{"projects":{"alpha":{"name":"alpha","tap":"tap-alpha","subnet":"172.31.0.0/30","mac":"02:00:00:00:00:01","ssh_port":2201,"egress":"proxy"}}}`
	os.WriteFile(filepath.Join(st.Dir, legacyFileName), []byte(legacy), 0o600)
	s, err := st.Load()
	if err != nil || s.Projects["alpha"].SSHPort != 2201 {
		t.Fatalf("legacy load: %+v, %v", s, err)
	}
	if err := st.Update(func(*State) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(st.Dir, legacyFileName)); !os.IsNotExist(err) {
		t.Errorf("legacy file still there: %v", err)
	}
	if s2, err := st.Load(); err != nil || !reflect.DeepEqual(s2, s) {
		t.Errorf("after migration: %+v, %v; want %+v", s2, err, s)
	}
}

// FuzzUnmarshal: whatever parses, renders and parses back to the same.
func FuzzUnmarshal(f *testing.F) {
	f.Add([]byte(header + "\nalpha\ttap-alpha\t172.31.0.0/30\t02:aa:bb:cc:dd:ee\tproxy\t2201\t1000\t-\n"))
	f.Add([]byte(header + "\n\n# comment\nb\tt\t10.0.0.4/30\tm\tnat\t0\t-\t7\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Unmarshal(data)
		if err != nil {
			return
		}
		b, err := Marshal(s)
		if err != nil {
			t.Fatalf("Marshal of a parsed state: %v", err)
		}
		s2, err := Unmarshal(b)
		if err != nil {
			t.Fatalf("Unmarshal of Marshal's output: %v\n%s", err, b)
		}
		if !reflect.DeepEqual(s, s2) {
			t.Fatalf("round trip changed the state:\n%+v\n%+v", s, s2)
		}
	})
}

func manyProjects(n int) *State {
	s := &State{Projects: make(map[string]Project, n)}
	sub := netip.MustParsePrefix("172.31.0.0/30")
	for i := 0; i < n; i++ {
		name := "p" + strconv.Itoa(i)
		s.Projects[name] = Project{Name: name, TAP: "tap-" + name, Subnet: sub, MAC: MAC(name), Egress: EgressProxy}
		a := sub.Addr()
		for j := 0; j < 4; j++ {
			a = a.Next()
		}
		sub = netip.PrefixFrom(a, 30)
	}
	return s
}

// BenchmarkUpdate4000 is what `net up` pays for the state at 4,000
// projects: lock, read, parse, change one, render, write, fsync, rename.
func BenchmarkUpdate4000(b *testing.B) {
	st := Store{Dir: b.TempDir()}
	data, _ := Marshal(manyProjects(4000))
	os.WriteFile(filepath.Join(st.Dir, FileName), data, 0o600)
	for b.Loop() {
		err := st.Update(func(s *State) error {
			s.Projects["bench"] = Project{Name: "bench", TAP: "tap-bench", Subnet: netip.MustParsePrefix("172.31.255.0/30"), MAC: MAC("bench"), Egress: EgressProxy}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMarshal4000(b *testing.B) {
	s := manyProjects(4000)
	for b.Loop() {
		Marshal(s)
	}
}

func BenchmarkUnmarshal4000(b *testing.B) {
	data, _ := Marshal(manyProjects(4000))
	for b.Loop() {
		Unmarshal(data)
	}
}
